"""Model specs resolve as users expect: a hub id through the Hugging Face cache, offline included."""
import os
import shutil
import subprocess
import sys

RESOLVE = ("import sys; from evaluators.models import load_model, model_folder\n"
           "try:\n"
           "    model, _ = load_model(sys.argv[1])\n"
           "except Exception as error:\n"
           "    print(f'{type(error).__name__}: {error}', file=sys.stderr); sys.exit(2)\n"
           "print(model_folder(sys.argv[1])); print(len(model.model.layers))")


def hub_cache(root, repo_id, files_from):
    """A Hugging Face hub cache holding one snapshot of `repo_id`, laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def resolve(spec, cache, offline=True):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1" if offline else "0"}
    return subprocess.run([sys.executable, "-c", RESOLVE, spec], capture_output=True, text=True, env=env)


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(llama_dir, tmp_path):
    snapshot = hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", llama_dir)
    result = resolve("tiny-org/tiny-llama", tmp_path / "hub")
    assert result.returncode == 0, result.stderr
    folder, layers = result.stdout.split()
    assert folder == str(snapshot) and layers == "6"


def test_an_id_neither_cached_nor_reachable_fails_in_one_line(tmp_path):
    (tmp_path / "hub").mkdir()
    result = resolve("tiny-org/not-there", tmp_path / "hub")
    assert result.returncode == 2
    assert "'tiny-org/not-there' is not a local folder, and neither the Hugging Face cache nor the hub " \
           "(HF_HUB_OFFLINE is set) provides it" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_balanced_placement_keeps_every_decoder_layer_whole_and_in_order(tiny_models):
    """What an actor of several GPUs loads with (`--device balanced`), planned for fake GPUs of
    equal memory: every layer on one GPU, consecutive layers together, every GPU used."""
    import torch

    from evaluators.models import balanced_device_map

    for family in ("llama", "qwen2", "phi3"):
        for gpus in (2, 3):
            placement = balanced_device_map(tiny_models[family], gpus, torch.float32, {i: 10**9 for i in range(gpus)})
            layers = [placement[f"model.layers.{i}"] for i in range(6)]
            assert layers == sorted(layers) and set(layers) == set(range(gpus)), (family, placement)
            assert not any(key.startswith("model.layers.") and key.count(".") > 2 for key in placement)  # none split
            assert placement["model.embed_tokens"] == 0

"""Healing (`python -m finetune.best`) on tiny models: it learns, exports faithfully, resumes exactly,
trains what each plan says, and refuses bad inputs before loading any weights."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune.heal
import finetune.train
from chromosomes import ChromosomeRecord
from evaluators.compact import build_compact
from evaluators.config import EvaluatorConfig
from evaluators.families import family_of
from evaluators.models import load_model
from evaluators.text import text_blocks
from finetune.best import main
from finetune.config import HealConfig
from finetune.model import attach_adapter, trainable_parameters
from finetune.train import measure
from tests.tiny import cut_layers, grammar_text

SKIP_ONLY = (1, 0, 1, 1, 0, 1)
WITH_MERGE = (1, 2, 1, 0, 1, 2)


def chromosome(folder, genes, model_dir, text_file):
    """A best.json as the GA writes it, search settings included (the merge needs them)."""
    settings = EvaluatorConfig(model=str(model_dir), data=str(text_file), seq_len=32, score_tokens=128,
                               align_tokens=64, batch_size=2, repair_tokens=256)
    path = folder / f"best-{''.join(map(str, genes))}.json"
    ChromosomeRecord(genes=genes, model=str(model_dir), num_layers=len(genes),
                     extra={"evaluator": settings.to_dict()}).save(path)
    return path


def options(best, out, text_file, held_out, *extra):
    return ["--chromosome", str(best), "--out", str(out), "--data", str(text_file), "--eval-texts", str(held_out),
            "--seq-len", "64", "--eval-seq-len", "64", "--eval-tokens", "1024", "--batch-size", "4",
            "--grad-accum", "1", "--warmup", "2", "--lr", "1e-2", "--no-progress", *extra]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


PROMPT = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def healed(tmp_path_factory, llama_dir, text_file, held_out):
    """A qv run that replaces an existing output folder; evaluates and checkpoints along the way."""
    root = tmp_path_factory.mktemp("healed")
    out = root / "out"
    out.mkdir()
    (out / "old-result.txt").write_text("replaced")
    best = chromosome(root, SKIP_ONLY, llama_dir, text_file)
    assert main(options(best, out, text_file, held_out, "--steps", "30", "--eval-every", "10",
                        "--checkpoint-every", "10", "--replace")) == 0
    return out, json.loads((out / "report.json").read_text())


def test_loss_falls_and_the_curves_are_in_tensorboard(healed):
    out, _ = healed
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    (held_out_curve,) = [tag for tag in events.Tags()["scalars"] if tag.startswith("eval/")]
    assert [event.step for event in events.Scalars(held_out_curve)] == [0, 10, 20, 30]


def test_held_out_perplexity_of_the_training_grammar_falls(healed, held_out):
    _, report = healed
    before, after = report["before"][str(held_out)], report["after"][str(held_out)]
    assert after["perplexity"] < 0.8 * before["perplexity"]
    assert after["tokens"] == before["tokens"] == 16 * 63
    assert report["training"]["steps"] == 30 and report["config"]["plan"] == "qv"
    assert report["parameters"]["lora"] > 0 and report["parameters"]["norm"] == 4 * 2 * 32 + 32


def test_export_replaces_the_old_folder_reloads_to_the_measured_model_and_generates(healed, held_out):
    out, report = healed
    assert not (out / "old-result.txt").exists()
    assert not list(out.parent.glob(".out.*")), "staging or replaced folders were left behind"
    assert not (out / "checkpoints").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 4
    tokenizer = AutoTokenizer.from_pretrained(out)
    blocks = text_blocks(str(held_out), tokenizer, 64, 1024)
    assert measure(reloaded, {str(held_out): blocks}, 4, torch.float32)[str(held_out)] == report["after"][str(held_out)]
    generated = reloaded.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (2, 24)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_adapter_on_the_rebuilt_compact_model_reproduces_the_export(healed):
    out, _ = healed
    record = ChromosomeRecord.load(out / "chromosome.json")
    assert record.genes == SKIP_ONLY
    base, _ = build_compact(record, record.model, HealConfig())
    rebuilt = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().eval()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(logits(rebuilt, PROMPT), logits(exported, PROMPT))


@pytest.mark.parametrize("plan", ["qv", "tail"])
def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(
        llama_dir, text_file, held_out, tmp_path, monkeypatch, capsys, plan):
    best = chromosome(tmp_path, WITH_MERGE, llama_dir, text_file)
    settings = ("--steps", "6", "--checkpoint-every", "2", "--dropout", "0.2", "--plan", plan)
    assert main(options(best, tmp_path / "whole", text_file, held_out, *settings)) == 0

    save = finetune.train.save_checkpoint

    def save_then_crash(root, parameters, optimizer, scheduler, state):
        save(root, parameters, optimizer, scheduler, state)
        if state.step == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(finetune.train, "save_checkpoint", save_then_crash)
        assert main(options(best, tmp_path / "cut", text_file, held_out, *settings)) == 130
    assert "step 4 is checkpointed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as fresh:  # a fresh start would throw the checkpoint away
        main(options(best, tmp_path / "cut", text_file, held_out, *settings))
    assert fresh.value.code == 2 and "add --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as changed:
        main(options(best, tmp_path / "cut", text_file, held_out, *settings, "--lr", "0.5", "--resume", str(tmp_path / "cut")))
    assert changed.value.code == 2 and "--lr 0.5 (run has 0.01)" in capsys.readouterr().err

    assert main(options(best, tmp_path / "cut", text_file, held_out, *settings, "--resume", str(tmp_path / "cut"))) == 0
    whole, cut = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[key], cut[key]) for key in whole)
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("whole", "cut")]
    assert reports[0]["after"] == reports[1]["after"] and reports[0]["before"] == reports[1]["before"]


PLAN_CASES = [  # family, plan, train_qk_norm, LoRA layers expected
    ("llama", "norm", False, set()),
    ("llama", "qv", False, {"q_proj", "v_proj"}),
    ("mistral", "wide", False, {"q_proj", "v_proj", "o_proj", "gate_proj"}),
    ("qwen2", "qv", False, {"q_proj", "v_proj"}),
    ("qwen3", "qv", False, {"q_proj", "v_proj"}),
    ("qwen3", "norm", True, set()),
    ("gemma2", "qv", False, {"q_proj", "v_proj"}),
    ("gemma3", "wide", True, {"q_proj", "v_proj", "o_proj", "gate_proj"}),
    ("phi3", "qv", False, {"qkv_proj"}),  # fused: LoRA on the whole qkv projection
    ("phi3", "wide", False, {"qkv_proj", "o_proj", "gate_up_proj"}),
    ("olmo2", "qv", True, {"q_proj", "v_proj"}),
    ("granite", "wide", False, {"q_proj", "v_proj", "o_proj", "gate_proj"}),
    ("mixtral", "qv", False, {"q_proj", "v_proj"}),
    ("qwen3_moe", "norm", False, set()),
]


@pytest.mark.parametrize("family, plan, qk_norm, lora", PLAN_CASES)
def test_each_plan_trains_its_parameters_and_nothing_else(family, plan, qk_norm, lora, tiny_models):
    model, _ = load_model(str(tiny_models[family]))
    own = family_of(model)
    cut_layers(model, SKIP_ONLY)
    names = trainable_parameters(attach_adapter(model, HealConfig(plan=plan, train_qk_norm=qk_norm)))
    lora_layers = {name.split(".")[-4] for name in names if ".lora_" in name}
    norms = {name for name in names if ".lora_" not in name}
    assert lora_layers == lora
    assert len([n for n in names if ".lora_A." in n]) == 4 * len(lora)  # every compact layer, once per target
    expected_norms = {name.rsplit(".", 1)[-1] for name in own.layer_norms + (own.head_norms if qk_norm else ())}
    assert {name.split(".")[-4] for name in norms if ".layers." in name} == expected_norms
    assert sum(".layers." not in name for name in norms) == 1  # the final norm
    assert len(norms) == 4 * len(expected_norms) + 1
    assert all(p.dtype == torch.float32 for p in names.values())


@pytest.mark.parametrize("family", ["gemma3", "phi3", "olmo2", "mixtral"])
def test_the_tail_plan_finds_the_norms_of_every_family(family, tiny_models):
    model, _ = load_model(str(tiny_models[family]))
    cut_layers(model, SKIP_ONLY)
    names = trainable_parameters(attach_adapter(model, HealConfig(plan="tail", tail_layers=1)))
    own = family_of(model).layer_norms
    early = {name.split(".")[3] for name in names if name.startswith(("model.layers.0.", "model.layers.1."))}
    assert early == set(own)  # layers outside the tail train their norms only
    assert any(name.startswith("model.layers.3.mlp.") for name in names)  # the tail layer in full


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_tail_plan_trains_the_head_and_last_layers_in_full_and_nothing_else(tied, tmp_path, text_file, held_out):
    from tests.tiny import build_model
    folder = tmp_path / "model"
    model = build_model("llama", folder)
    if tied:  # SmolLM2's layout: lm_head is the input embedding matrix
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.save_pretrained(folder)
    best = chromosome(tmp_path, SKIP_ONLY, folder, text_file)
    assert main(options(best, tmp_path / "tail", text_file, held_out, "--plan", "tail", "--tail-layers", "2",
                        "--steps", "3", "--repair", "none")) == 0
    base, _ = load_model(str(folder))
    before = cut_layers(base, SKIP_ONLY).state_dict()
    after = load_file(tmp_path / "tail" / "model.safetensors")
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    in_tail = {key for key in after if key.startswith(("model.layers.2.", "model.layers.3."))}
    norms = {key for key in after if key.endswith("norm.weight")}
    head = {"model.embed_tokens.weight"} if tied else {"lm_head.weight"}
    assert changed == in_tail | norms | head  # 4 compact layers: the last 2 in full, every norm, the head
    assert ("lm_head.weight" in after) == (not tied)  # a tied head stays tied: the export keeps its size
    assert not (tmp_path / "tail" / "adapter").exists()
    report = json.loads((tmp_path / "tail" / "report.json").read_text())
    counts = report["parameters"]
    assert counts["lora"] == 0 and counts["full"] > 0 and counts["trained"] == counts["norm"] + counts["full"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tail", dtype=torch.float32).eval()
    blocks = text_blocks(str(held_out), AutoTokenizer.from_pretrained(tmp_path / "tail"), 64, 1024)
    assert measure(reloaded, {"held": blocks}, 4, torch.float32)["held"]["perplexity"] == \
        pytest.approx(report["after"][str(held_out)]["perplexity"], rel=1e-5)


def test_a_norm_run_changes_norm_weights_only(llama_dir, text_file, held_out, tmp_path):
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    assert main(options(best, tmp_path / "norm", text_file, held_out, "--plan", "norm", "--steps", "3",
                        "--gradient-checkpointing", "--repair", "none")) == 0
    base, _ = load_model(str(llama_dir))
    before = cut_layers(base, SKIP_ONLY).state_dict()
    after = load_file(tmp_path / "norm" / "model.safetensors")
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed and all(key.endswith("norm.weight") for key in changed)
    assert len(changed) == 4 * 2 + 1


def test_a_bf16_run_trains_in_fp32_and_exports_a_bf16_model(llama_dir, text_file, held_out, tmp_path):
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    assert main(options(best, tmp_path / "bf16", text_file, held_out, "--dtype", "bfloat16", "--steps", "3",
                        "--repair", "none")) == 0
    assert {v.dtype for v in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    adapter = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    # updates of a few lr steps are far below bf16's resolution near 1: only fp32 norms can hold them
    base, _ = load_model(str(llama_dir))
    final_norm = adapter["base_model.model.model.norm.weight"]
    moved = (final_norm - cut_layers(base, SKIP_ONLY).model.norm.weight).abs()
    assert 0 < moved.max() < 0.05 and final_norm.to(torch.bfloat16).float().ne(final_norm).any()


@pytest.fixture
def inputs(tmp_path, llama_dir, text_file, held_out, monkeypatch):
    """A valid run whose weights must never be loaded: every case below has to fail before that."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded for an input that should have been refused first")

    monkeypatch.setattr(finetune.heal, "build_compact", forbidden)
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "deep.json").write_text(json.dumps({**json.loads(best.read_text()), "genes": [1] * 8,
                                                    "num_layers": 8}))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    return lambda *extra, chromosome=best: options(chromosome, tmp_path / "out", text_file, held_out, *extra)


BAD_INPUTS = [  # extra options (or another chromosome), words the error must contain
    ({"chromosome": "missing.json"}, "cannot read chromosome file"),
    ({"chromosome": "bad.json"}, "not valid JSON"),
    ({"chromosome": "deep.json"}, "made for a model with 8 decoder layers, but"),
    ((["--plan", "everything"]), "plan must be one of norm, qv, wide, tail"),
    ((["--plan", "tail", "--tail-layers", "5"]), "tail_layers (5) exceeds the 4 layers of the compact model"),
    ((["--steps", "-1"]), "steps must be an integer of at least 0"),
    ((["--repair", "magic"]), "repair must be one of none, lsq"),
    ((["--lr", "-1"]), "lr must be a positive finite number"),
    ((["--steps", "5", "--warmup", "5"]), "warmup (5) must be shorter than steps (5)"),
    ((["--dropout", "1.5"]), "dropout must lie in [0, 1)"),
    ((["--loss", "distill"]), "loss must be one of lm, kd, mix"),
    ((["--loss", "mix", "--kd-weight", "2"]), "kd_weight must lie in [0, 1]"),
    ((["--seq-len", "4096"]), "seq_len (4096) exceeds the context"),
    ((["--eval-tokens", "10"]), "must hold at least one window"),
    ((["--dtype", "int8"]), "unknown dtype 'int8'"),
    ((["--out", "TAKEN"]), "already exists: choose another --out, or pass --replace"),
    ((["--resume", "OUT"]), "nothing to resume"),
    ((["--resume", "TAKEN"]), "--out"),
    ((["--data", "no-such-text"]), "unknown text 'no-such-text'"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS, ids=[m.split()[0] for _, m in BAD_INPUTS])
def test_bad_inputs_fail_early_with_a_clear_message_and_lose_nothing(change, message, inputs, tmp_path, capsys):
    if isinstance(change, dict):
        argv = inputs(chromosome=tmp_path / change["chromosome"])
    else:
        extra = [str(tmp_path / {"TAKEN": "taken", "OUT": "out"}[part]) if part.isupper() else part for part in change]
        argv = inputs(*extra)
    with pytest.raises(SystemExit) as failure:
        main(argv)
    error = capsys.readouterr().err
    assert failure.value.code == 2
    assert message in error and "Traceback" not in error
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "out").exists()


def test_the_module_runs_as_a_command_and_documents_every_setting(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "finetune.best", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for name in HealConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in shown.stdout
    for flag in ("--chromosome", "--out", "--replace", "--resume"):
        assert flag in shown.stdout
    missing = subprocess.run([sys.executable, "-m", "finetune.best", "--chromosome", str(tmp_path / "none.json")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read chromosome file" in missing.stderr


def test_steps_0_exports_the_repaired_compact_model_untrained_with_its_efficiency(llama_dir, text_file, held_out,
                                                                                  tmp_path):
    """A hand-written chromosome file (genes, model, depth, and the text its cuts are repaired on,
    so that the test reads no shared data) is exported repaired, as a search scores it."""
    best = tmp_path / "hand.json"
    text = {"data": str(text_file), "seq_len": 32, "score_tokens": 128, "batch_size": 2, "repair_tokens": 256}
    best.write_text(json.dumps({"format": "gaprune.chromosome", "format_version": 1, "genes": list(SKIP_ONLY),
                                "model": str(llama_dir), "num_layers": 6, "extra": {"evaluator": text}}))
    argv = options(best, tmp_path / "compact", text_file, held_out, "--steps", "0", "--measure")
    assert main(argv) == 0
    report = json.loads((tmp_path / "compact" / "report.json").read_text())
    assert report["after"] is None and report["training"]["steps"] == 0
    assert report["surgery_settings"]["repair"] == "lsq"
    assert not (tmp_path / "compact" / "adapter").exists()
    efficiency = report["efficiency"]
    assert efficiency["compact"]["layers"] == 4 and efficiency["dense"]["layers"] == 6
    assert efficiency["ratios"]["parameters"] < 1 and efficiency["compact"]["decode_tokens_per_s"] > 0
    assert 0 < efficiency["compact"]["file_bytes"] < efficiency["dense"]["file_bytes"]

    from evaluators.fitness import ModelEvaluator
    scorer = ModelEvaluator(EvaluatorConfig(model=str(llama_dir), **text))  # a search's defaults otherwise: repair lsq
    stack = scorer.stack(SKIP_ONLY)
    from evaluators.surgery import layer_view
    with layer_view(scorer.model, stack.modules, stack.layer_types):
        viewed = logits(scorer.model, PROMPT)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", dtype=torch.float32).eval()
    assert torch.allclose(logits(exported, PROMPT), viewed, atol=1e-5)
    raw, _ = load_model(str(llama_dir))
    assert not torch.allclose(logits(cut_layers(raw, SKIP_ONLY), PROMPT), viewed, atol=1e-3)  # repair acted
    assert exported.generate(PROMPT, max_new_tokens=5, do_sample=False, pad_token_id=2).shape == (2, 21)
    measured = report["before"][str(held_out)]["perplexity"]
    blocks = text_blocks(str(held_out), AutoTokenizer.from_pretrained(tmp_path / "compact"), 64, 1024)
    assert measure(exported, {"held": blocks}, 4, torch.float32)["held"]["perplexity"] == pytest.approx(measured, rel=1e-5)


def test_sigterm_exits_like_ctrl_c_with_a_checkpoint_and_the_run_resumes(llama_dir, text_file, held_out, tmp_path):
    """What SLURM and Kubernetes send before a kill: exit 143, the last checkpoint kept, resumable."""
    import signal
    import time
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    # Far more steps than the signal can take to arrive (a step takes milliseconds), or the
    # run may finish first on a busy machine.
    argv = [sys.executable, "-m", "finetune.best", *options(best, tmp_path / "out", text_file, held_out,
                                                            "--steps", "300", "--checkpoint-every", "1",
                                                            "--no-efficiency")]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / ".out.partial" / "checkpoints"
    while not (checkpoints / "latest.json").is_file():
        assert run.poll() is None, run.communicate()[1]
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr
    assert "is checkpointed" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # nothing half-published
    latest = checkpoints / json.loads((checkpoints / "latest.json").read_text())["folder"]
    stopped_at = json.loads((latest / "state.json").read_text())["step"]
    assert 1 <= stopped_at < 300
    resumed = subprocess.run([*argv, "--resume", str(tmp_path / "out")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["training"]["steps"] == 300


TINY_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def choice_accuracy(model, tokenizer, rows):
    """Accuracy the harness's way, computed here: the choice (after the harness's delimiter, a space)
    with the highest summed log-probability."""
    hits = 0
    for row in rows:
        context = tokenizer(row["question"], add_special_tokens=False)["input_ids"]  # the harness adds no BOS
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return hits / len(rows)


@pytest.fixture
def tiny_task(tmp_path):
    """A multiple-choice task of the training grammar, defined from a local JSON file."""
    import random
    rng = random.Random(3)
    sentences = grammar_text(40, seed=4).split(".")
    rows = []
    for sentence in (s.strip() for s in sentences if len(s.split()) > 3):
        words = sentence.split()
        other = rng.choice(sentences).split()[2:] or ["the"]  # another sentence's continuation
        rows.append({"question": " ".join(words[:2]), "choices": [" ".join(words[2:]), " ".join(other)], "label": 0})
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / "tiny_choice.yaml").write_text(TINY_TASK.format(data=folder / "data.jsonl"))
    return folder, rows


def test_tasks_are_scored_by_lm_eval_before_and_after_healing(llama_dir, text_file, held_out, tmp_path, tiny_task,
                                                              monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, rows = tiny_task
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    assert main(options(best, tmp_path / "out", text_file, held_out, "--steps", "10", "--no-efficiency",
                        "--tasks", "tiny_choice", "--tasks-path", str(folder))) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    before, after = (report["zero_shot"][when]["tiny_choice"] for when in ("before", "after"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    compact, _ = build_compact(ChromosomeRecord.load(best), str(llama_dir), HealConfig(data_dir=None))
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert before["acc,none"] == pytest.approx(choice_accuracy(compact.eval(), tokenizer, rows))
    assert after["acc,none"] == pytest.approx(choice_accuracy(healed, tokenizer, rows))
    assert report["versions"]["lm_eval"]


@pytest.mark.parametrize("tasks, message", [
    ("arc_easy", "lm-eval task arc_easy: its data set cannot be loaded"),
    ("no_such_task", "unknown lm-eval task(s): no_such_task"),
])
def test_a_task_without_its_data_fails_in_one_line_before_any_training(llama_dir, text_file, held_out, tmp_path,
                                                                       monkeypatch, capsys, tasks, message):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # this machine has no hub: fail now, not after retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    with pytest.raises(SystemExit) as failure:
        main(options(best, tmp_path / "out", text_file, held_out, "--steps", "3", "--tasks", tasks))
    error = capsys.readouterr().err
    assert failure.value.code == 2 and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("plan, works", [("wide", False), ("qv", True), ("tail", True)])
def test_a_lora_plan_a_family_cannot_take_is_refused_before_any_weights_load(plan, works, tiny_models, text_file,
                                                                             held_out, tmp_path, capsys):
    best = chromosome(tmp_path, SKIP_ONLY, tiny_models["mixtral"], text_file)  # experts: no gate_proj
    argv = options(best, tmp_path / "out", text_file, held_out, "--plan", plan, "--steps", "3", "--no-efficiency",
                   "--repair", "none")
    if works:
        assert main(argv) == 0
        return
    with pytest.raises(SystemExit) as failure:
        main(argv)
    error = capsys.readouterr().err
    assert failure.value.code == 2 and "Traceback" not in error
    assert "plan wide puts LoRA on q_proj, v_proj, o_proj, gate_proj, but MixtralForCausalLM has no gate_proj" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_the_search_alignments_are_reused_while_its_run_folder_is_there(tmp_path):
    from evaluators.compact import surgery_settings

    store = tmp_path / "run" / "alignments"
    record = lambda folder: ChromosomeRecord(  # noqa: E731
        (1, 2, 1, 1, 0, 1), "tiny", 6, extra={"evaluator": EvaluatorConfig(model="tiny", align_cache=str(folder)).to_dict()})
    store.mkdir(parents=True)
    assert surgery_settings(record(store), "tiny", HealConfig()).align_cache == str(store)
    gone = tmp_path / "moved" / "alignments"
    assert surgery_settings(record(gone), "tiny", HealConfig()).align_cache is None
    assert not gone.parent.exists()


def test_kd_loss_is_zero_for_the_teacher_itself_and_matches_the_measured_kl(llama_dir, text_file):
    from evaluators.perplexity import fidelity, final_hidden
    from finetune.train import kd_loss, student_states
    model, tokenizer = load_model(str(llama_dir))
    ids = text_blocks(str(text_file), tokenizer, 32, 256)
    assert float(kd_loss(model, model, student_states(model, ids), ids, 2.0)) == pytest.approx(0.0, abs=1e-6)
    cut = cut_layers(load_model(str(llama_dir))[0], SKIP_ONLY)
    measured = fidelity(cut, ids, 4, final_hidden(model, ids, 4), model.get_output_embeddings())["kl"]
    assert float(kd_loss(cut, model, student_states(cut, ids), ids, 1.0)) == pytest.approx(measured, rel=1e-4)
    assert measured > 0


@pytest.mark.parametrize("loss", ["lm", "kd"])
def test_losses_over_several_chunks_give_the_same_value_and_gradients_as_one(loss, llama_dir, text_file, monkeypatch):
    """The chunks recomputed in the backward pass change memory, not the numbers."""
    from finetune.train import kd_loss, lm_loss, student_states
    teacher, tokenizer = load_model(str(llama_dir))
    ids = text_blocks(str(text_file), tokenizer, 32, 256)

    def value_and_gradient(chunk: int) -> tuple[float, torch.Tensor]:
        monkeypatch.setattr(finetune.train, "LOGIT_CHUNK", chunk)
        student = cut_layers(load_model(str(llama_dir))[0], SKIP_ONLY)
        norm = student.model.norm.weight.requires_grad_(True)
        states = student_states(student, ids)
        value = lm_loss(student, states, ids) if loss == "lm" else kd_loss(student, teacher, states, ids, 2.0)
        value.backward()
        return float(value.detach()), norm.grad.clone()

    whole, chunked = value_and_gradient(4096), value_and_gradient(50)  # 248 predicted tokens: 5 chunks
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    assert torch.allclose(chunked[1], whole[1], rtol=1e-4, atol=1e-7)


def test_mix_weighs_both_losses_from_one_student_forward(llama_dir, text_file):
    """A second student forward for the lm half made a mix step cost more than a kd and an lm
    step together."""
    from finetune.train import kd_loss, lm_loss, step_loss, student_states
    teacher, tokenizer = load_model(str(llama_dir))
    student = cut_layers(load_model(str(llama_dir))[0], SKIP_ONLY)
    ids = text_blocks(str(text_file), tokenizer, 32, 256)
    forwards = []
    student.model.register_forward_hook(lambda *_: forwards.append(1))
    config = HealConfig(loss="mix", kd_weight=0.25, kd_temperature=2.0)
    with torch.no_grad():
        mixed = float(step_loss(student, teacher, ids, config))
        assert len(forwards) == 1
        states = student_states(student, ids)
        expected = 0.25 * kd_loss(student, teacher, states, ids, 2.0) + 0.75 * lm_loss(student, states, ids)
    assert mixed == pytest.approx(float(expected), rel=1e-6)


def test_distillation_healing_brings_the_cut_model_towards_the_dense_one(llama_dir, text_file, held_out, tmp_path):
    """The tiny dense model is untrained, so language modelling on the text pulls away from it:
    the more of the loss is distillation, the nearer the healed model ends to its teacher."""
    from evaluators.perplexity import fidelity, final_hidden
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    dense, tokenizer = load_model(str(llama_dir))
    blocks = text_blocks(str(held_out), tokenizer, 64, 1024)
    reference = final_hidden(dense, blocks, 4)
    kl = {}
    for loss in ("cut", "lm", "mix", "kd"):
        steps = ["--steps", "0"] if loss == "cut" else ["--steps", "12", "--loss", loss, "--plan", "wide"]
        assert main(options(best, tmp_path / loss, text_file, held_out, *steps, "--no-efficiency")) == 0
        healed = AutoModelForCausalLM.from_pretrained(tmp_path / loss, dtype=torch.float32).eval()
        kl[loss] = fidelity(healed, blocks, 4, reference)["kl"]
    assert kl["kd"] < kl["mix"] < kl["lm"] and kl["kd"] < kl["cut"], kl
    assert json.loads((tmp_path / "kd" / "report.json").read_text())["config"]["loss"] == "kd"


def test_equal_time_gives_lm_the_steps_another_loss_took_at_lms_pace():
    """experiments.heal_plans --equal-time: distillation's slower steps buy lm more of them."""
    from experiments.heal_plans import equal_time_configs
    configs = [HealConfig(plan=plan, loss=loss, steps=16, warmup=2) for plan in ("qv", "wide") for loss in ("lm", "kd")]
    rows = [{"train s": seconds} for seconds in (160.0, 240.0, 200.0, 300.0)]
    extra = equal_time_configs(configs, rows)
    assert [(c.plan, c.loss, c.steps, c.warmup) for c in extra] == [("qv", "lm", 24, 2), ("wide", "lm", 24, 2)]


def test_a_teacher_that_would_not_fit_beside_the_student_is_refused_with_the_numbers(llama_dir):
    from finetune.heal import check_teacher_fits, weight_bytes
    dense, _ = load_model(str(llama_dir))
    size = weight_bytes(str(llama_dir), torch.bfloat16)
    assert size == 2 * sum(p.numel() for p in dense.parameters())
    check_teacher_fits(size, 10 * size, torch.device("cuda:0"))
    with pytest.raises(ValueError, match=r"does not fit beside the student on cuda:0.*--teacher-device"):
        check_teacher_fits(size, size, torch.device("cuda:0"))


def test_the_heal_curve_reads_every_measurement_and_the_training_time_before_it(llama_dir, text_file, held_out,
                                                                                tmp_path):
    """experiments.heal_curve: before, each --eval-every point and after, with summed step times."""
    from experiments.heal_curve import curve
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    config = HealConfig(steps=4, warmup=1, eval_every=2, batch_size=4, grad_accum=1, seq_len=64, lr=1e-2,
                        data=str(text_file), eval_texts=str(held_out), eval_tokens=1024, eval_seq_len=64,
                        device="cpu", checkpoint_every=0, efficiency=False)
    report = finetune.heal.run(finetune.heal.prepare(best, config, tmp_path / "out"), progress=False)
    rows = curve(tmp_path / "out" / "tb", config, report)
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert rows[0][str(held_out)] == report["before"][str(held_out)]["perplexity"]
    assert rows[-1][str(held_out)] == report["after"][str(held_out)]["perplexity"]
    assert 0 == rows[0]["train minutes"] < rows[1]["train minutes"] < rows[2]["train minutes"]
    assert rows[2]["train minutes"] * 60 == pytest.approx(report["training"]["seconds"], rel=0.5)


def test_a_checkpoint_saved_before_a_setting_existed_resumes_without_a_change():
    """Settings added since (the loss, its teacher's device) take their defaults, which change nothing."""
    saved = HealConfig().to_dict()
    for name in ("teacher_device", "loss", "kd_temperature", "kd_weight"):
        saved.pop(name)
    assert HealConfig().changes_from(HealConfig.from_dict(saved)) == []


def test_a_hand_written_file_is_cut_with_a_searchs_default_settings_on_this_machines_placement():
    """Without saved search settings the cut is the one a search with defaults scores."""
    from evaluators.compact import surgery_settings

    hand = ChromosomeRecord((1, 0, 1, 1, 0, 1), "tiny", 6)
    placement = HealConfig(data_dir="texts", repair="none")
    settings = surgery_settings(hand, "tiny", placement)
    expected = replace(EvaluatorConfig(model="tiny"), dtype=placement.dtype, device=placement.device,
                       data_dir="texts", repair="none", threads=0)
    assert settings == expected and settings.data == EvaluatorConfig.data

"""Seam repair and KL fitness on tiny models: the fit does what its equations say, is folded into
the weights exactly, is cached, and costs nothing where there is no seam."""
import math

import pytest
import torch
import torch.nn.functional as F

from chromosomes import blocks
from evaluators.config import EvaluatorConfig
from evaluators.families import FAMILIES
from evaluators.fitness import Fitness, ModelEvaluator, WORST_LOSS, finite_loss
from evaluators.repair import (NormalEquations, RepairError, Seam, random_rotation, removal_order, seam_targets,
                               with_output_map)
from evaluators.surgery import LayerStack, layer_view
from tests.tiny import REPAIRABLE

SKIPS = [1, 0, 0, 1, 1, 0]  # two seams: after layer 0 (to 2) and after layer 4 (to 5)
MERGED = [1, 2, 1, 0, 1, 1]  # a merge block then a skip
ATTENTION_SEAM = [1, (2, 0), (0, 64), 1, 1, 1]  # layer 1's attention writes the seam to layer 2's attention
MLP_SEAM = [1, (0, 64), 1, 1, 1, 1]  # layer 0's MLP writes the seam to layer 1's attention, inside layer 1


def make(folder, text_file, **overrides):
    settings = dict(model=str(folder), data=str(text_file), seq_len=32, score_tokens=128, batch_size=2,
                    align_tokens=64, repair_tokens=256)
    return ModelEvaluator(EvaluatorConfig(**{**settings, **overrides}))


@pytest.fixture(scope="module")
def repaired(llama_dir, text_file):
    return make(llama_dir, text_file)


def plan_stack(genes):
    plan = blocks(genes)
    return LayerStack(plan, plan, tuple(range(len(plan))), None)


def mlp_seams(*pairs):
    """Seams after whole layers: (position, last removed layer) -> that layer's MLP sub-layer."""
    return [Seam(position, "mlp", 2 * layer + 1) for position, layer in pairs]


@pytest.mark.parametrize("genes, seams", [
    ([1, 1, 1, 1], []),
    ([1, 0, 0, 1, 1, 0], mlp_seams((0, 2), (2, 5))),
    ([1, 2, 1, 0, 1, 1], mlp_seams((0, 1), (1, 3))),
    ([0, 1, 1, 1], []),  # a leading cut has no kept layer before it to repair
    # sub-layers: layer 1 keeps no MLP, so its attention writes the seam up to layer 2's attention
    ([1, (2, 0), (0, 8), 1], [Seam(1, "attention", 4)]),
    ([1, (0, 8), 1, 1], [Seam(0, "mlp", 2)]),  # ends inside layer 1: at its attention
    ([(2, 0), 0, (2, 4), 1], [Seam(0, "attention", 3)]),  # narrowed layers count as kept
])
def test_every_kept_sublayer_followed_by_removed_ones_is_a_seam(genes, seams):
    assert seam_targets(plan_stack(genes), len(genes)) == seams


@pytest.mark.parametrize("genes, min_run, seams", [
    ([1, 0, 0, 1, 1, 0], 2, mlp_seams((0, 2))),  # the run of one after layer 4 is left as cut
    ([1, 0, 0, 1, 1, 0], 3, []),
    ([1, 2, 1, 0, 1, 1], 2, []),  # a merged layer counts as removed: both seams are runs of one
    ([1, 2, 0, 1, 1, 1], 2, mlp_seams((0, 2))),
    ([1, (2, 0), 0, 1], 2, [Seam(1, "attention", 5)]),  # three sub-layers: at least 2 * 2 - 1
    ([1, (0, 8), 1, 1], 2, []),
])
def test_only_long_runs_are_seams_when_asked(genes, min_run, seams):
    assert seam_targets(plan_stack(genes), len(genes), min_run) == seams


def test_the_fit_solves_the_ridge_problem_and_shrinks_to_the_identity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    truth = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    equations = NormalEquations(6, torch.device("cpu"))
    for part in (x[:200], x[200:]):  # accumulated over batches, as the repair does
        equations.add(part, part @ truth)
    assert equations.rows == 500 and equations.xx.shape == (6, 6)  # memory: hidden^2, never tokens
    assert torch.allclose(equations.solve(0.0), truth, atol=1e-8)
    assert torch.allclose(equations.solve(1e8), torch.eye(6, dtype=torch.float64), atol=1e-4)


def refit_loss(gram: torch.Tensor, weight: torch.Tensor, kept: list[int]) -> float:
    """min over W_K of ||X W^T - X_K W_K^T||^2, from the Gram matrix alone (no ridge)."""
    k = torch.tensor(kept, dtype=torch.long)
    residual = gram - gram[:, k] @ torch.linalg.solve(gram[k][:, k], gram[k]) if kept else gram
    return float(torch.trace(weight @ residual @ weight.T))


@pytest.mark.parametrize("unit_size", [1, 2])
def test_the_removal_order_is_greedy_backward_elimination_under_the_refit(unit_size):
    """Each step drops the unit whose loss to the refitted output is smallest, given those gone:
    checked against the refit's loss computed from scratch for every candidate."""
    generator = torch.Generator().manual_seed(unit_size)
    x = torch.randn(400, 12, generator=generator, dtype=torch.float64) @ torch.randn(12, 12, generator=generator,
                                                                                        dtype=torch.float64)
    gram, weight = x.T @ x, torch.randn(5, 12, generator=generator, dtype=torch.float64)
    order = removal_order(gram, weight, 0.0, unit_size)
    columns = lambda units: [u * unit_size + j for u in units for j in range(unit_size)]
    alive, expected = list(range(12 // unit_size)), []
    while len(alive) > 1:
        cheapest = min(alive, key=lambda u: refit_loss(gram, weight, columns([a for a in alive if a != u])))
        alive.remove(cheapest)
        expected.append(cheapest)
    assert order == alive + expected[::-1]


def test_removing_in_blocks_keeps_a_permutation_and_nearly_the_refits_loss():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 64, generator=generator, dtype=torch.float64) * torch.rand(64, generator=generator,
                                                                                      dtype=torch.float64)
    gram, weight = x.T @ x, torch.randn(8, 64, generator=generator, dtype=torch.float64)
    one, blocked = removal_order(gram, weight, 1e-6), removal_order(gram, weight, 1e-6, block=4)
    assert sorted(blocked) == list(range(64))
    for width in (8, 16, 32, 48):
        random_best = min(refit_loss(gram, weight, sorted(torch.randperm(64, generator=generator)[:width].tolist()))
                          for _ in range(50))
        greedy, block_loss = (refit_loss(gram, weight, sorted(o[:width])) for o in (one, blocked))
        assert greedy < random_best and block_loss < random_best and block_loss < 1.5 * greedy


def test_the_scaling_fit_recovers_a_scaling_in_the_rotated_basis_and_is_the_best_one():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 3, 8, dtype=torch.float64)
    q = random_rotation(8)
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    truth = q @ torch.diag(torch.linspace(0.2, 2.0, 8, dtype=torch.float64)) @ q.T
    equations = NormalEquations(8, torch.device("cpu"))
    equations.add(x, x @ truth)
    assert torch.allclose(equations.solve_scaling(0.0, q), truth, atol=1e-8)
    assert torch.allclose(equations.solve_scaling(1e8, q), torch.eye(8, dtype=torch.float64), atol=1e-4)
    # on a map that is not a scaling, no other scaling in that basis fits better
    other = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    noisy = NormalEquations(8, torch.device("cpu"))
    noisy.add(x, x @ other)
    best = noisy.solve_scaling(0.0, q)
    error = lambda t: float((x @ t - x @ other).pow(2).sum())
    for step in (1e-3, -1e-3):
        for j in range(8):
            nudged = q @ torch.diag((q.T @ best @ q).diagonal() + step * (torch.arange(8) == j)) @ q.T
            assert error(best) <= error(nudged)


def test_folding_the_map_into_down_proj_multiplies_the_mlp_output(llama_dir):
    from evaluators.models import load_model
    model, _ = load_model(str(llama_dir))
    layer = model.model.layers[1]
    transform = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 6
    folded = with_output_map(layer, transform, FAMILIES["llama"])
    x = torch.randn(3, 7, 32)
    assert torch.allclose(folded.mlp(x), layer.mlp(x) @ transform, atol=1e-5)
    assert folded.self_attn is layer.self_attn and folded.mlp.down_proj is not layer.mlp.down_proj
    assert torch.equal(layer.mlp(x), model.model.layers[1].mlp(x))  # the dense layer is untouched


def seam_errors(repaired, genes, layers=6):
    """Per seam, the squared distance of the raw and of the repaired block's output from the dense
    state it imitates, on the repair statistics."""
    repairer = repaired.builder.repairer
    raw, fixed = repaired.builder.raw_stack(genes), repaired.stack(genes)
    found = []
    for seam in seam_targets(raw, layers):
        errors = []
        for stack in (raw, fixed):
            outputs = []
            hook = stack.modules[seam.position].register_forward_hook(lambda _m, _a, out: outputs.append(out))
            with layer_view(repaired.model, stack.modules, stack.layer_types), torch.no_grad():
                for batch in repairer._batches():
                    repaired.model.model(input_ids=batch, use_cache=False)
            hook.remove()
            errors.append(sum(float(((o[0] if isinstance(o, tuple) else o) - d).pow(2).sum())
                              for o, d in zip(outputs, repairer.dense_after(seam.target))))
        found.append(errors)
    return found


@pytest.mark.parametrize("genes", [SKIPS, MERGED, ATTENTION_SEAM, MLP_SEAM],
                         ids=["skip", "merge", "attention-anchor", "inside-a-layer"])
@pytest.mark.parametrize("inputs, method", [("pruned", "lsq"), ("dense", "lsq"), ("pruned", "lsq-attn"),
                                            ("pruned", "scale")])
def test_a_repaired_seam_matches_the_dense_state_better_than_the_raw_cut(llama_dir, text_file, genes, inputs, method):
    """On the repair statistics, the repaired block's output is nearer the dense one than the raw cut's."""
    for raw, fixed in seam_errors(make(llama_dir, text_file, repair_inputs=inputs, repair=method), genes):
        # the scaling has hidden values to fit, not hidden^2: it only has to beat the raw cut (d = 1)
        assert fixed < (1.0 if method == "scale" else 0.9) * raw, (raw, fixed)


@pytest.mark.parametrize("family", REPAIRABLE)
def test_every_repairable_family_repairs_its_seams(family, tiny_models, text_file):
    """Granite among them (its residual multiplier scales the output the map is fitted on), and
    the families whose norm after each sub-layer makes the map a gradient fit (Gemma 2/3, OLMo 2):
    nearer the dense state on the repair statistics, and nearer the dense model on scoring text
    the fit never read."""
    errors = seam_errors(make(tiny_models[family], text_file), SKIPS)
    assert errors and all(fixed < 0.95 * raw for raw, fixed in errors), errors
    raw = make(tiny_models[family], text_file, repair="none", fitness="kl").evaluate([SKIPS])[0]
    fixed = make(tiny_models[family], text_file, fitness="kl").evaluate([SKIPS])[0]
    assert fixed.kl < raw.kl, (raw.kl, fixed.kl)


def test_scale_repair_needs_the_closed_form(tiny_models, text_file):
    with pytest.raises(RepairError, match="use --repair lsq"):
        make(tiny_models["gemma3"], text_file, repair="scale").evaluate([SKIPS])


def test_lsq_attn_folds_a_map_into_o_proj_too_and_fits_the_mlp_map_after_it(llama_dir, text_file):
    plain, attn = (make(llama_dir, text_file, repair_inputs="dense", repair=m).stack(SKIPS) for m in ("lsq", "lsq-attn"))
    dense = make(llama_dir, text_file, repair="none").stack(SKIPS)
    o, down = (lambda s: s.modules[0].self_attn.o_proj.weight), (lambda s: s.modules[0].mlp.down_proj.weight)
    assert torch.equal(o(plain), o(dense)) and not torch.equal(o(attn), o(dense))
    assert not torch.equal(down(attn), down(plain))  # fitted on the layer with its new attention output


def test_repair_brings_the_cut_model_closer_to_the_dense_one_on_scoring_text(llama_dir, text_file):
    raw = make(llama_dir, text_file, repair="none", fitness="kl").evaluate([SKIPS])[0]
    fixed = make(llama_dir, text_file, fitness="kl").evaluate([SKIPS])[0]
    assert fixed.kl < 0.9 * raw.kl, (raw.kl, fixed.kl)


def test_fits_are_cached_and_a_dense_chromosome_needs_none(repaired):
    first = repaired.evaluate([SKIPS])[0]
    fitted = len(repaired.builder.repairer._fitted)
    again = repaired.evaluate([SKIPS])[0]
    assert again.nll == first.nll and len(repaired.builder.repairer._fitted) == fitted
    dense_stack = repaired.stack([1] * 6)
    assert dense_stack.keys == dense_stack.plan and list(dense_stack.modules) == repaired.builder.dense_layers


def test_with_dense_inputs_a_fit_depends_on_its_block_alone(llama_dir, text_file):
    evaluator = make(llama_dir, text_file, repair_inputs="dense")
    first = evaluator.stack([1, 0, 1, 1, 0, 1])  # seams after layer 0 (to 1) and after layer 3 (to 4)
    second = evaluator.stack([1, 0, 1, 0, 1, 1])  # the same first seam behind other layers
    assert first.modules[0] is second.modules[0]  # one fit, shared
    assert len(evaluator.builder.repairer._fitted) == 3
    pruned = make(llama_dir, text_file, repair_inputs="pruned").stack([1, 0, 1, 1, 0, 1])
    assert not torch.equal(pruned.modules[2].mlp.down_proj.weight, first.modules[2].mlp.down_proj.weight)


def test_repair_statistics_come_from_windows_the_fitness_never_reads(repaired):
    split = repaired.split
    repairer = repaired.builder.repairer
    assert repairer.blocks.data_ptr() == split.tune.data_ptr()
    assert repaired.config.repair_blocks == 8 and split.tune.shape[0] >= 8
    scored = {tuple(row.tolist()) for row in split.score}
    assert not scored & {tuple(row.tolist()) for row in repairer.blocks}


def test_kl_fitness_is_the_divergence_of_next_token_distributions(llama_dir, text_file):
    evaluator = make(llama_dir, text_file, repair="none", fitness="kl")
    dense, cut = evaluator.evaluate([[1] * 6, SKIPS])
    assert dense.kl == pytest.approx(0.0, abs=1e-6) and dense.value == dense.kl
    model, score = evaluator.model, evaluator.split.score
    with torch.no_grad():
        q = F.log_softmax(model(input_ids=score).logits[:, :-1].float(), -1)
        stack = evaluator.stack(SKIPS)
        with layer_view(model, stack.modules, stack.layer_types):
            p = F.log_softmax(model(input_ids=score).logits[:, :-1].float(), -1)
    expected = float((q.exp() * (q - p)).sum() / (score.shape[0] * (score.shape[1] - 1)))
    assert cut.kl == pytest.approx(expected, rel=1e-4) and cut.objective == "kl" and cut.value == cut.kl
    assert math.isclose(cut.perplexity, math.exp(cut.nll))


def test_a_non_finite_loss_is_recorded_as_the_worst_finite_value():
    assert finite_loss(float("nan")) == finite_loss(float("inf")) == finite_loss(1e9) == WORST_LOSS
    assert finite_loss(2.5) == 2.5
    assert math.isfinite(math.exp(WORST_LOSS))
    restored = Fitness.from_dict({"perplexity": 3.0, "nll": 1.1, "tokens": 10, "seconds": 0.1, "calibrated": False})
    assert restored.kl is None and restored.value == 3.0  # checkpoints written before KL existed


def test_a_layer_without_down_proj_is_refused_with_a_message():
    with pytest.raises(RepairError, match="has no mlp.down_proj linear layer.*--repair none"):
        from evaluators.repair import output_projection
        output_projection(torch.nn.Linear(2, 2), FAMILIES["llama"], FAMILIES["llama"].down)


@pytest.mark.parametrize("repair", ["none", "lsq"])
def test_a_model_that_computes_nan_gets_the_worst_fitness_and_the_search_goes_on(tmp_path, text_file, repair):
    from ga.checkpoint import RunFolder
    from ga.config import SearchConfig
    from ga.engine import evolve
    from tests.tiny import build_model
    model = build_model("llama", tmp_path / "nan", num_layers=6)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    evaluator = make(tmp_path / "nan", text_file, repair=repair)
    broken, healthy = evaluator.evaluate([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]])
    assert broken.nll == WORST_LOSS and math.isfinite(broken.perplexity)
    assert math.isfinite(healthy.nll) and healthy.nll < WORST_LOSS
    search = SearchConfig(pop=6, gens=2, remove=2, init="random", seed=1, merge=False, screen_tokens=0)
    state = evolve(evaluator, search, RunFolder(tmp_path / "run"), progress=False)  # checkpoints are valid JSON
    assert state.best()[1].nll < WORST_LOSS
    resumed = evolve(evaluator, SearchConfig(**{**search.to_dict(), "gens": 3}), RunFolder(tmp_path / "run"),
                     progress=False)
    assert resumed.generation == 3


def test_the_fit_cache_keeps_within_its_byte_budget(llama_dir, text_file):
    evaluator = make(llama_dir, text_file, repair_inputs="pruned")
    evaluator.builder.repairer.cache_bytes = 1  # room for the newest fit only
    evaluator.evaluate([SKIPS, MERGED, [1, 1, 0, 1, 0, 1]])
    assert len(evaluator.builder.repairer._fitted) == 1
    again = make(llama_dir, text_file, repair_inputs="pruned").evaluate([SKIPS, MERGED, [1, 1, 0, 1, 0, 1]])
    assert [f.nll for f in again] == [f.nll for f in evaluator.evaluate([SKIPS, MERGED, [1, 1, 0, 1, 0, 1]])]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_folding_a_map_into_a_mixture_multiplies_its_output(family, tiny_models):
    """Every expert's down projection takes the map, so the router's weighted sum does too."""
    from evaluators.families import family_of
    from evaluators.models import load_model
    model, _ = load_model(str(tiny_models[family]))
    layer, moe = model.model.layers[1], family_of(model)
    transform = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 6
    folded = with_output_map(layer, transform, moe)
    x = torch.randn(3, 7, 32)
    assert torch.allclose(folded.mlp(x), layer.mlp(x) @ transform, atol=1e-5)
    assert folded.mlp.gate is layer.mlp.gate and folded.mlp.experts.gate_up_proj is layer.mlp.experts.gate_up_proj
    assert folded.mlp.experts.down_proj is not layer.mlp.experts.down_proj


def test_a_mixture_without_stacked_experts_is_refused_seam_repair_by_name(tiny_models, text_file):
    from evaluators.repair import written_weights
    from evaluators.families import family_of
    from evaluators.models import load_model
    model, _ = load_model(str(tiny_models["mixtral"]))
    layer = model.model.layers[0]
    del layer.mlp.experts
    with pytest.raises(RepairError, match=r"no stacked experts' down_proj.*--repair none"):
        written_weights(layer, family_of(model), family_of(model).down)


def test_a_bf16_model_passes_the_additive_mlp_check_despite_its_rounding(llama_dir, text_file):
    """In bf16 the residual sum rounds away a little of the MLP output; the check that refuses a
    norm after the MLP must tell that rounding from a norm (found on the GPU at Llama-3-8B shape)."""
    fitness = make(llama_dir, text_file, dtype="bfloat16").evaluate([SKIPS])[0]
    assert math.isfinite(fitness.perplexity)

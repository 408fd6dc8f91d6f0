"""The memory plan: gradient checkpointing, micro-batches, compute dtype and loss scaling, and
how a plan is decided per card (trainer.memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from timellm_job.jobs import SpecError, load_spec, spec_hash
from timellm_job.jobs.spec import DataSpec, ModelSpec
from timellm_job.jobs.spec_files import parse_spec
from timellm_job.trainer import checkpoint_state, memory
from timellm_job.trainer.backbone import load_backbone
from timellm_job.trainer.grad_checkpointing import blocks, is_on, set_gradient_checkpointing
from timellm_job.trainer.memory import Card, GiB, decide
from timellm_job.trainer.model import TimeLLM

SHARED = Path(__file__).resolve().parents[2] / "shared" / "spec"
DATA = DataSpec.model_validate({"path": "x", "seq_len": 64, "pred_len": 16, "label_len": 8})
T4 = Card("Tesla T4", 15 * GiB, (7, 5))
L4 = Card("NVIDIA L4", 22 * GiB, (8, 9))
H100 = Card("NVIDIA H100 80GB HBM3", 79 * GiB, (9, 0))


def build(family="llama", dropout=0.1, **kw):
    random = {"family": family, "hidden_size": 64, "num_layers": 3, "num_heads": 4}
    spec = ModelSpec.model_validate({"backbone": {"random": random}, "d_model": 16, "d_ff": 32, "n_heads": 4,
                                     "num_tokens": 20, "patch_len": 16, "stride": 8, "dropout": dropout, **kw})
    backbone = load_backbone(spec, "cpu")
    torch.manual_seed(0)
    return TimeLLM(spec, DATA, backbone)


def grads(model, x, y, micro=None):
    """The trainable gradients of one step over (x, y), in micro-batches of ``micro`` as the loop
    computes them (each micro-batch's loss weighted by its share of the batch)."""
    for p in model.trainable_state().values():
        p.grad = None
    torch.manual_seed(1)
    n = x.shape[0]
    micro = micro or n
    for s in range(0, n, micro):
        loss = torch.nn.functional.mse_loss(model(x[s:s + micro]), y[s:s + micro])
        (loss * (micro / n) if micro < n else loss).backward()
    return {k: p.grad.clone() for k, p in model.trainable_state().items()}


def batch(n=16, channels=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 64, channels, generator=g), torch.randn(n, 16, channels, generator=g)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_recomputes_the_backbone_and_gives_the_same_gradients_bit_for_bit(family):
    model = build(family)
    x, y = batch()
    calls = []
    for block in blocks(model.backbone.model):  # a module inside each block: it runs whenever the block does
        next(block.children()).register_forward_hook(lambda *_: calls.append(1))
    plain = grads(model, x, y)
    plain_calls = len(calls)
    set_gradient_checkpointing(model.backbone.model, True)
    assert is_on(model.backbone.model)
    calls.clear()
    recomputed = grads(model, x, y)
    # each block ran again in the backward pass: the activations were dropped, not kept
    assert len(calls) == 2 * plain_calls == 2 * len(blocks(model.backbone.model))
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)  # dropout included (RNG restored)
    set_gradient_checkpointing(model.backbone.model, False)
    assert not is_on(model.backbone.model) and all(torch.equal(plain[k], v) for k, v in grads(model, x, y).items())
    with torch.no_grad():  # evaluation: nothing recomputed, nothing changed
        set_gradient_checkpointing(model.backbone.model, True)
        calls.clear()
        model.eval()
        model(x)
        assert len(calls) == len(blocks(model.backbone.model))


def test_micro_batches_give_the_full_batch_gradient_up_to_float_summation_order():
    model = build(dropout=0.0)  # dropout masks are drawn per micro-batch: they differ by design
    x, y = batch()
    full = grads(model, x, y)
    largest = max(g.abs().max().item() for g in full.values())
    for micro in (8, 4, 1):
        acc = grads(model, x, y, micro)
        for k in full:
            # fp32: the 16 samples' gradients are added in another order. Measured: every entry
            # within 1e-7 of the largest gradient entry (some true gradients are 0, e.g. the key
            # projection's bias under softmax, so a relative bound per tensor means nothing);
            # bounded at 1e-6 of it
            assert (acc[k] - full[k]).abs().max().item() <= 1e-6 * largest, (micro, k)
        assert not all(torch.equal(acc[k], full[k]) for k in full)  # the order did change


def test_compute_dtype_and_checkpointing_are_chosen_by_the_card():
    assert memory.compute_dtype("auto", T4) == "fp16"  # no native bf16 below compute capability 8.0
    assert memory.compute_dtype("auto", L4) == "bf16"
    assert memory.compute_dtype("auto", Card("cpu")) == "fp32"
    assert memory.compute_dtype("fp16", Card("cpu")) == "fp16"  # as written
    assert memory.checkpointing("auto", T4) and memory.checkpointing("auto", L4)
    assert not memory.checkpointing("auto", H100) and not memory.checkpointing("auto", Card("cpu"))
    assert memory.checkpointing(True, Card("cpu"))


def spec_with(**train):
    raw = {"name": "j", "storage": {"root": "/tmp/x"}, "data": {"path": "/x.csv", "seq_len": 64, "pred_len": 16},
           "model": {"backbone": {"random": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}}, "d_ff": 32},
           "train": {"batch_size": 24, **train}}
    return parse_spec(raw, Path("/"))


def test_an_auto_micro_batch_is_probed_largest_divisor_first_and_reused_on_the_same_card():
    spec = spec_with(micro_batch_size="auto", gradient_checkpointing="auto")
    tried = []

    def probe(micro, ckpt):  # peak grows with the micro-batch: 1.2 GiB per sample
        tried.append(micro)
        if micro > 12:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return int(1.2 * GiB * micro)

    plan = decide(spec, T4, "fp16", True, 24, None, probe)
    # 24 ran out; 12 needs 14.4 GiB > 90% of 15; 8 fits
    assert (plan.micro_batch_size, plan.gradient_checkpointing, plan.how) == (8, True, "probed")
    assert tried == [24, 12, 8] and plan.probe_peak_bytes == int(1.2 * GiB * 8)
    again = decide(spec, T4, "fp16", True, 24, plan.to_json(), probe)
    assert (again.micro_batch_size, again.how) == (8, "reused") and tried == [24, 12, 8]  # no probe
    moved = decide(spec, L4, "bf16", True, 24, plan.to_json(), probe)  # the VM came back as an L4
    assert moved.how == "probed" and moved.micro_batch_size == 12 and "Tesla T4" in moved.note


def test_after_an_out_of_memory_the_plan_starts_below_the_failed_one():
    spec = spec_with(micro_batch_size="auto", gradient_checkpointing="auto")
    failed = {**memory.MemoryPlan(24, False, "fp32", 24, "cpu").to_json(),
              "oom": {"micro_batch_size": 24, "gradient_checkpointing": False}}
    plan = decide(spec, Card("cpu"), "fp32", False, 24, failed, None)
    assert (plan.micro_batch_size, plan.how) == (12, "after-oom") and "24 ran out" in plan.note
    last = {**failed, "oom": {"micro_batch_size": 1, "gradient_checkpointing": False}}
    plan = decide(spec, Card("cpu"), "fp32", False, 24, last, None)  # then checkpointing comes on
    assert (plan.micro_batch_size, plan.gradient_checkpointing) == (24, True)
    with pytest.raises(memory.OutOfPlans):
        decide(spec, Card("cpu"), "fp32", False, 24, {**failed, "oom": {"micro_batch_size": 1,
                                                                          "gradient_checkpointing": True}}, None)
    fixed = spec_with(micro_batch_size=6)  # as written, whatever happened before
    assert decide(fixed, Card("cpu"), "fp32", False, 24, failed, None).micro_batch_size == 6


def test_the_diagnosis_names_the_card_the_plan_and_what_to_change():
    spec = spec_with(micro_batch_size=24, gradient_checkpointing=False)
    plan = memory.MemoryPlan(24, False, "fp16", 24, "Tesla T4", 15 * GiB)
    diag = memory.diagnose(spec, plan, T4, "cpu")
    assert not diag["smaller_plan"]
    for part in ("Tesla T4 (15.0 GiB)", "micro-batch 24 of 24", "gradient checkpointing off", "fp16",
                 "train.micro_batch_size", "train.gradient_checkpointing", "data.seq_len"):
        assert part in diag["reason"], part
    auto = spec_with(micro_batch_size="auto", gradient_checkpointing=False)
    assert memory.diagnose(auto, plan, T4, "cpu")["smaller_plan"]
    smallest = memory.MemoryPlan(1, False, "fp16", 24, "Tesla T4", 15 * GiB)
    assert not memory.diagnose(auto, smallest, T4, "cpu")["smaller_plan"]
    # in validation no micro-batch helps: the evaluation batch is named instead
    evaluating = memory.diagnose(auto, plan, T4, "cpu", evaluating=True)
    assert not evaluating["smaller_plan"] and "train.eval_batch_size 8" in evaluating["reason"]


def test_the_colab_t4_example_is_accepted_and_a_bad_micro_batch_names_the_field(tmp_path):
    spec = load_spec(SHARED / "jobs-next" / "colab-t4.yaml")
    assert (spec.train.micro_batch_size, spec.train.gradient_checkpointing, spec.model.compute_dtype) == \
        ("auto", "auto", "auto")
    with pytest.raises(SpecError, match=r"train\.micro_batch_size: 5 does not divide"):
        spec_with(micro_batch_size=5)
    with pytest.raises(SpecError, match=r"train\.micro_batch_size"):
        spec_with(micro_batch_size=0)
    with pytest.raises(SpecError, match=r"train\.micro_batch_size: 8 does not divide the 12 samples"):
        spec_with(micro_batch_size=8, nproc=2)
    with pytest.raises(SpecError, match=r"model\.compute_dtype"):
        parse_spec({**spec_with().model_dump(mode="json"), "model": {
            **spec_with().model.model_dump(mode="json"), "compute_dtype": "fp8"}}, Path("/"))


def test_the_memory_fields_do_not_change_the_spec_hash():
    base = spec_hash(spec_with())
    assert spec_hash(spec_with(micro_batch_size=4, gradient_checkpointing=True)) == base
    assert spec_hash(spec_with(batch_size=12)) != base


def test_the_loss_scaler_state_goes_into_the_checkpoint_and_comes_back():
    model = build(compute_dtype="fp16")
    assert model.backbone.dtype == torch.float16  # the backbone computes in fp16, trainable weights stay fp32
    assert all(p.dtype == torch.float32 for p in model.trainable_state().values())
    opt = torch.optim.Adam(list(model.trainable_state().values()), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(4)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    scaler.update(1024.0)  # a scale no fresh scaler has
    snap = checkpoint_state.capture(model, opt, sched, checkpoint_state.Progress(global_step=3), extra={"scaler": scaler.state_dict()})
    files = {k: bytes(b"".join(v)) if isinstance(v, list) else v for k, v in snap.to_files().items()}
    fresh = torch.amp.GradScaler("cpu")
    checkpoint_state.restore(checkpoint_state.read_files(files), model, opt, sched, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 1024.0

"""Scales refined against the whole model (quant/refine_model.py) on tiny random models: lower
KL on held-out tokens than without, codes unchanged, an interrupted run resumes to the same
result, the top-k KL is the exact KL when k is the vocabulary, bad options are errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch.quant import refine_model as RM
from tests.quant.test_driver import tiny_bert, tiny_llama, tokens
from tests.quant.test_refine import layers, mean_kl

pytestmark = pytest.mark.usefixtures("one_thread")




OPTS = {"refine_steps": 40, "refine_lr": 5e-3, "refine_batch": 4, "refine_eval_every": 8, "refine_patience": 0}


def test_model_refinement_lowers_held_out_kl_and_keeps_the_codes():
    calib, held_out = tokens(32, 32, seed=1), tokens(16, 32, seed=5)  # disjoint seeds
    base, plain, refined = tiny_llama(), tiny_llama(), tiny_llama()
    cfg = QuantConfig(format="int3", group_size=32, method="gptq")
    quantize_model(plain, cfg, calibration=calib, progress=False)
    summary = quantize_model(refined, cfg.with_(refine="model", method_options=OPTS), calibration=calib,
                             progress=False)
    rep = summary.method_report["refine_model"]
    kl_plain, kl_refined = mean_kl(base, plain, held_out), mean_kl(base, refined, held_out)
    assert kl_refined < 0.9 * kl_plain, (kl_plain, kl_refined)
    # the report's held-out calibration windows (4 of 32) improved too, and its "before" is GPTQ's model
    assert rep["heldout_after"] < rep["heldout_before"] and rep["windows"] == {"train": 28, "heldout": 4}
    assert rep["train_before"] == pytest.approx(mean_kl(base, plain, calib[:4]), rel=2e-2)  # gemm vs fp32
    a, b = layers(plain), layers(refined)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:  # GPTQ's codes (the same calibration, no block refinement): untouched
        assert torch.equal(a[name].weight, b[name].weight), name
    assert sum(not torch.equal(a[n].scales, b[n].scales) for n in a) == len(a)
    assert all(torch.isfinite(m.scales.float()).all() and torch.isfinite(m.biases.float()).all() for m in b.values())


def _refine(tmp_path, interrupt_at: int | None, monkeypatch) -> dict[str, torch.Tensor]:
    """RTN int4, then the model stage in ``tmp_path``; with ``interrupt_at`` the run is stopped
    (KeyboardInterrupt) before that step and started again, as a user would."""
    calib = tokens(8, 32, seed=2)
    teacher = RM.teacher_outputs(tiny_llama(), calib, topk=16)

    def quantized() -> nn.Module:
        model = tiny_llama()
        quantize_model(model, QuantConfig(format="int4", group_size=32))
        return model
    model = quantized()
    opts = RM.ModelRefineOptions(steps=12, lr=5e-3, batch=2, holdout=0.25, eval_every=3, save_every=2, topk=16,
                                 patience=0)
    if interrupt_at is not None:
        real = RM._train_step

        def stopping(model, run, *args):
            if run.step == interrupt_at:
                raise KeyboardInterrupt
            return real(model, run, *args)
        monkeypatch.setattr(RM, "_train_step", stopping)
        with pytest.raises(KeyboardInterrupt):
            RM.refine_model(model, calib, teacher, opts, tmp_path, progress=False)
        monkeypatch.setattr(RM, "_train_step", real)
        assert all(m.scales.requires_grad is False for m in layers(model).values())
    rep = RM.refine_model(model, calib, teacher, opts, tmp_path, progress=False)
    assert rep["resumed_from"] == (None if interrupt_at is None else interrupt_at // 2 * 2)
    assert rep["steps"] == 12 and (tmp_path / RM.STATE_FILE).exists()
    result = {n: m.scales.clone() for n, m in layers(model).items()}
    again = quantized()  # a rerun of a finished run: loaded, not redone
    assert RM.refine_model(again, calib, teacher, opts, tmp_path, progress=False)["resumed_from"] == 12
    assert all(torch.equal(result[n], m.scales) for n, m in layers(again).items())
    return result


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    whole = _refine(tmp_path / "a", None, monkeypatch)
    resumed = _refine(tmp_path / "b", 7, monkeypatch)  # progress saved at step 6: steps 6..11 redone
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_other_settings_in_the_work_dir_are_an_error(tmp_path):
    calib = tokens(4, 16, seed=2)
    model = tiny_llama()
    teacher = RM.teacher_outputs(model, calib, topk=8)
    quantize_model(model, QuantConfig(format="int4", group_size=32))
    RM.refine_model(model, calib, teacher, RM.ModelRefineOptions(steps=2, holdout=0.0, topk=8), tmp_path,
                    progress=False)
    with pytest.raises(ValueError, match="refine_model.pt holds a refinement of other"):
        RM.refine_model(model, calib, teacher, RM.ModelRefineOptions(steps=3, holdout=0.0, topk=8), tmp_path,
                        progress=False)


def test_topk_kl_is_the_exact_kl_with_the_whole_vocabulary_and_a_lower_bound_below():
    ids = tokens(2, 16, seed=3)
    base, other = tiny_llama(0), tiny_llama(1)
    with torch.no_grad():
        out = other(input_ids=ids).logits
    exact = mean_kl(base, other, ids)
    full = float(RM.teacher_outputs(base, ids, topk=96).loss(out, torch.arange(2)))
    part = float(RM.teacher_outputs(base, ids, topk=8).loss(out, torch.arange(2)))
    assert full == pytest.approx(exact, rel=1e-4)
    assert 0.0 < part < exact


def test_encoder_refinement_lowers_the_hidden_state_error():
    calib, held_out = tokens(16, 32, seed=1), tokens(8, 32, seed=5)
    base, plain, refined = tiny_bert(), tiny_bert(), tiny_bert()
    cfg = QuantConfig(format="int3", group_size=32)
    quantize_model(plain, cfg)
    summary = quantize_model(refined, cfg.with_(refine="model", method_options=OPTS), calibration=calib,
                             progress=False)
    assert summary.method_report["refine_model"]["heldout_after"] < summary.method_report["refine_model"][
        "heldout_before"]

    def err(m: nn.Module) -> float:
        with torch.no_grad():
            h, ref = m(input_ids=held_out).last_hidden_state, base(input_ids=held_out).last_hidden_state
        return float((h - ref).pow(2).sum() / ref.pow(2).sum())
    assert err(refined) < 0.9 * err(plain), (err(plain), err(refined))


def test_norms_are_trained_when_asked():
    calib = tokens(8, 32, seed=2)
    model = tiny_llama()
    before = model.model.norm.weight.clone()
    teacher = RM.teacher_outputs(model, calib, topk=16)
    quantize_model(model, QuantConfig(format="int3", group_size=32))
    RM.refine_model(model, calib, teacher, RM.ModelRefineOptions(steps=4, lr=1e-2, holdout=0.0, norms=True),
                    progress=False)
    assert not torch.equal(model.model.norm.weight, before)
    assert model.model.norm.weight.requires_grad  # the model's own flags are restored


@pytest.mark.parametrize("key, value, message", [
    ("refine_steps", -1, "steps must be an int >= 0, got -1"),
    ("refine_lr", 0.0, r"lr must be a number in \(0, 1\), got 0.0"),
    ("refine_batch", 0, "batch must be a positive int, got 0"),
    ("refine_holdout", 1.0, r"holdout must be a fraction in \[0, 1\), got 1.0"),
    ("refine_topk", 0, "topk must be a positive int, got 0"),
    ("refine_norms", "yes", "norms must be a bool, got 'yes'"),
])
def test_bad_options_are_errors_before_any_work(key, value, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        quantize_model(model, QuantConfig(format="int4", group_size=32, method="gptq", refine="model",
                                          method_options={key: value}), calibration=tokens(4, 16))
    assert not layers(model)  # nothing was quantized


def test_bad_refine_mode_and_too_few_windows_are_errors():
    with pytest.raises(ValueError, match=r"QuantConfig.refine must be a bool or one of \('block', 'model'\), "
                                         "got 'whole'"):
        QuantConfig(refine="whole")
    with pytest.raises(ValueError, match="unknown keys \\['refine_topk'\\]"):  # a model-stage key, block mode
        quantize_model(tiny_llama(), QuantConfig(format="int4", group_size=32, method="gptq", refine="block",
                                                 method_options={"refine_topk": 8}), calibration=tokens(4, 16))
    model = tiny_llama()
    calib = tokens(1, 16)
    teacher = RM.teacher_outputs(model, calib, topk=8)
    quantize_model(model, QuantConfig(format="int4", group_size=32))
    with pytest.raises(ValueError, match="leaves none to train on"):
        RM.refine_model(model, calib, teacher, RM.ModelRefineOptions(holdout=0.5), progress=False)
    with pytest.raises(ValueError, match="the teacher's outputs cover"):
        RM.refine_model(model, tokens(2, 16), teacher, RM.ModelRefineOptions(holdout=0.0), progress=False)


def test_a_non_finite_loss_skips_the_step_and_the_scales_stay_finite(caplog):
    calib = tokens(8, 32, seed=2)
    model = tiny_llama()
    teacher = RM.teacher_outputs(model, calib, topk=16)
    teacher.logp[1, 3, 0] = float("nan")  # a corrupt teacher entry in one training window
    quantize_model(model, QuantConfig(format="int3", group_size=32))
    before = {n: m.scales.clone() for n, m in layers(model).items()}
    opts = RM.ModelRefineOptions(steps=8, lr=5e-3, batch=1, holdout=0.0, topk=16)  # one epoch: meets window 1
    with caplog.at_level("WARNING", logger="metal_marlin_torch"):
        rep = RM.refine_model(model, calib, teacher, opts, progress=False)
    assert "has a non-finite loss; skipped" in caplog.text
    assert rep["steps"] == 8 and rep["train_after"] < rep["train_before"]  # the other steps trained
    after = layers(model)
    assert all(torch.isfinite(m.scales.float()).all() and torch.isfinite(m.biases.float()).all()
               for m in after.values())
    assert any(not torch.equal(before[n], m.scales) for n, m in after.items())

"""Device selection and device-aware precision (the GPU paths are resolved here without a GPU)."""

import pytest
import torch

from spine_ttrl.engine import precision


def test_auto_picks_the_gpu_only_when_one_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert precision.resolve_device("auto") == torch.device("cuda")
    assert precision.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert precision.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="only 2 CUDA GPU"):
        precision.resolve_device("cuda:2")


def test_asking_for_a_missing_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        precision.resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        precision.resolve_device("gpu0")


def test_bf16_is_decided_for_the_device_the_model_is_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    # a visible GPU that supports bf16 does not make a CPU model use bf16
    assert precision.autocast_dtype_for("auto", "cpu") is None
    assert precision.autocast_dtype_for("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert precision.autocast_dtype_for("fp32", "cuda") is None
    assert precision.autocast_dtype_for("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert precision.autocast_dtype_for("auto", "cuda") is None


def test_device_setting_is_validated():
    from spine_ttrl.config import make_config

    assert make_config("spine", overrides={"model": {"device": "cuda:3"}}).model.device == "cuda:3"
    with pytest.raises(ValueError, match="device must be"):
        make_config("spine", overrides={"model": {"device": "tpu"}})


def test_cli_refuses_a_missing_gpu_in_one_line(tmp_path, capsys, monkeypatch):
    from spine_ttrl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["adapt", "--device", "cuda", "--data", "arith:1:2:0", "--out", str(tmp_path / "run"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no CUDA GPU is visible" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_generators_and_batches_follow_the_engine_device():
    from spine_ttrl.engine.builtin import BuiltinEngine

    eng = BuiltinEngine(model=None, tokenizer=None, sampler=None, autocast_dtype=None, lora=False)
    g = eng.generator(7)
    assert g.device == torch.device("cpu")
    # the same stream as the former CPU generator: the CPU path is unchanged
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_compute_name_records_device_type_and_precision():
    from spine_ttrl.engine.precision import compute_name

    assert compute_name("cpu", None) == "cpu fp32"
    assert compute_name(torch.device("cpu"), torch.bfloat16) == "cpu bf16"
    assert compute_name("cuda:1", torch.bfloat16) == "cuda bf16"  # the index is not part of how it computes


def test_machine_name_names_the_cpu_model_and_its_native_bf16_instructions(tmp_path, monkeypatch):
    from spine_ttrl.engine import precision

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert precision.cpu_model_name(str(info)) == "AMD EPYC 7B13"
    assert precision.cpu_model_name(str(tmp_path / "none")) not in ("", None)  # platform's name, or "unknown CPU"
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Some CPU")
    for amx, avx, isa in ((True, True, "amx"), (False, True, "avx512_bf16"), (False, False, "no native bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx, raising=False)
        assert precision.machine_name("cpu") == f"Some CPU ({isa})"
        assert precision.machine_name(torch.device("cpu")) == f"Some CPU ({isa})"

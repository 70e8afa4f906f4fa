"""The accelerate/DeepSpeed launch files shipped in configs/accelerate load with accelerate's own
parser and say what their comments promise."""

from pathlib import Path

import pytest

pytest.importorskip("accelerate")
from accelerate.commands.config.config_args import load_config_from_file  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize("name, stage, processes, machines", [
    ("zero2", 2, 8, 1), ("zero3", 3, 8, 1), ("zero3_multinode", 3, 16, 2)])
def test_launch_files(name, stage, processes, machines):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.deepspeed_config["zero_stage"] == stage
    assert (cfg.num_processes, cfg.num_machines) == (processes, machines)
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    assert "-m spine_ttrl adapt --engine trl" in path.read_text()

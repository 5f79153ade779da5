import json
import time

from cluster.launch import MetricsProgress
from trainer.config import load_config


def test_progress_follows_metrics_records_and_truncation(tmp_path, capsys):
    cfg = load_config(None, [f"run.output={tmp_path}", "train.iters=5"])
    path = tmp_path / "metrics.jsonl"
    with MetricsProgress(cfg, poll_s=0.05) as progress:
        with open(path, "w") as f:
            for step in (1, 2, 3):
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            f.write('{"step": 4, "lo')  # half-written: not counted yet
        time.sleep(0.3)
        path.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")  # a resume truncated the file
        time.sleep(0.3)
        with open(path, "a") as f:
            f.write(json.dumps({"step": 5, "loss": 0.125}) + "\n")
    assert not progress._thread.is_alive()
    err = capsys.readouterr().err
    assert "5/5" in err and "loss=0.125" in err and "3/5" in err

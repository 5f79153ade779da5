"""The run's final error names the FIRST failure of the run (issue 12), not what later restarts tripped over
(before, a feed that refused a restart was all the message said). Ranks record what ended them under
`<run.output>/failures/`; records older than this launch are ignored."""
import time

from cluster.student_group import _failure_message, first_failure, record_failure
from trainer.config import config_from_dict


def test_the_message_names_the_first_failure_of_this_launch(tmp_path):
    out = str(tmp_path / "run")
    cfg = config_from_dict({"run": {"output": out}, "cluster": {"student": {"max_failures": 2}}})
    record_failure(out, "old", 0, RuntimeError("from an earlier launch"))
    time.sleep(0.01)
    since = time.time()
    record_failure(out, "a1", 1, ValueError("bad embedding shape\ntraceback lines"))
    time.sleep(0.01)
    record_failure(out, "a2", 0, RuntimeError("rank 0 asked for step 3, already served"))
    assert first_failure(out, since)["rank"] == 1
    message = _failure_message(cfg, RuntimeError("Training failed after 3 attempts"), since)
    assert "first failure: rank 1: ValueError: bad embedding shape;" in message
    assert "earlier launch" not in message and "traceback lines" not in message
    assert "cluster.student.max_failures=2" in message and "no valid checkpoint" in message

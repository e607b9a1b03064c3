"""Ctrl-C (SIGINT, sent from outside while the library is mid-step) stops Trainer.train()
cleanly: the step completes, a checkpoint of it is written, the script carries on after the
loop, and resuming continues from there."""
import json
import os
import signal
import subprocess
import sys

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import small_model
from nanomegatron import Trainer, TrainConfig, DataConfig
config = TrainConfig(model=small_model(), data=DataConfig(seq_len=64, synthetic_tokens=65536), batch_size=8,
                     max_steps=10000)
trainer = Trainer(config, run_dir=sys.argv[1], resume=True)
last = None
for step, m in trainer.train():
    last = step
    print(f"step {{step}}", flush=True)
print(f"stopped after step {{last}}; trainer at {{trainer.step_count}}", flush=True)
trainer.shutdown()
"""


def test_sigint_stops_cleanly_and_resumes(tmp_path):
    code = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stdout:
        if line.startswith("step 3"):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "interrupted" in err
    last = int(out.strip().splitlines()[-1].split("after step ")[1].split(";")[0])
    assert 3 <= last < 10000
    assert f"trainer at {last}" in out
    assert (run / "latest").read_text() == f"step_{last:06d}\n"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, last + 1))
    # Resuming continues with the next step (interrupted again right away).
    p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    first = p.stdout.readline()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert first == f"step {last + 1}\n"

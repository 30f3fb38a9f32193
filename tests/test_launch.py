"""The launchers in launch/, run against stub `infllava` and `gcloud` commands on PATH."""

import os
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stub(bin_dir, name, body):
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


def env_with(bin_dir):
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_tpu_pod_quotes_each_argument_for_the_remote_shell(tmp_path):
  stub(tmp_path, "gcloud", f'printf "%s\\n" "$@" > {tmp_path}/argv\n')
  subprocess.run([f"{REPO}/launch/tpu_pod.sh", "pod", "zone-a", "configs/my cfg.py",
                  "gs://bucket/run1"], check=True, env=env_with(tmp_path))
  argv = (tmp_path / "argv").read_text().splitlines()
  assert argv[:8] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "zone-a",
                      "--worker=all"]
  command = argv[argv.index("--command") + 1]
  assert command.endswith(" && infllava train --config configs/my\\ cfg.py --workdir "
                          "gs://bucket/run1 --distributed"), command
  # The remote shell splits it back into exactly these arguments (no empty '' at the end).
  words = subprocess.run(["bash", "-c", f'printf "%s\\n" {command.split(" && ", 1)[1]}'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
  assert words == ["infllava", "train", "--config", "configs/my cfg.py", "--workdir",
                   "gs://bucket/run1", "--distributed"]


def test_tpu_pod_with_log_detaches_the_run_on_each_worker(tmp_path):
  stub(tmp_path, "gcloud", f'printf "%s\\n" "$@" > {tmp_path}/argv\n')
  subprocess.run([f"{REPO}/launch/tpu_pod.sh", "pod", "zone-a", "cfg.py", "gs://b/r", "--x"],
                 check=True, env={**env_with(tmp_path), "LOG": "my run.log"})
  argv = (tmp_path / "argv").read_text().splitlines()
  command = argv[argv.index("--command") + 1]
  # Run by a remote shell (here with stub infllava and nohup), the ssh command returns at
  # once, and the run's output lands in the log file.
  stub(tmp_path, "infllava", 'sleep 2; echo "args: $*"\n')
  stub(tmp_path, "nohup", '"$@"\n')
  remote = command.replace("cd ~/infllava-jax", f"cd {tmp_path}")
  start = time.monotonic()
  subprocess.run(["bash", "-c", remote], check=True, env=env_with(tmp_path))
  assert time.monotonic() - start < 1.5
  log = tmp_path / "my run.log"
  deadline = time.monotonic() + 10
  while "args" not in (log.read_text() if log.exists() else ""):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  assert log.read_text() == "args: train --config cfg.py --workdir gs://b/r --distributed --x\n"


def test_local_launcher_passes_sigterm_to_every_process(tmp_path):
  # Each stub process writes its id, then waits; on SIGTERM it writes 'saved' and exits 0.
  stub(tmp_path, "infllava", f'''
id=""; while [ $# -gt 0 ]; do [ "$1" = --process-id ] && id=$2; shift; done
trap 'echo saved > {tmp_path}/done.$id; exit 0' TERM
echo up > {tmp_path}/up.$id
while true; do sleep 0.1; done
''')
  launcher = subprocess.Popen([f"{REPO}/launch/local.sh", "configs/synthetic.py", "run"],
                              env={**env_with(tmp_path), "NUM_PROCESSES": "2"})
  deadline = time.monotonic() + 30
  while not all((tmp_path / f"up.{i}").exists() for i in (0, 1)):
    assert time.monotonic() < deadline and launcher.poll() is None
    time.sleep(0.1)
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=30) == 0
  assert [(tmp_path / f"done.{i}").read_text() for i in (0, 1)] == ["saved\n", "saved\n"]


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
  stub(tmp_path, "infllava", f'''
id=""; while [ $# -gt 0 ]; do [ "$1" = --process-id ] && id=$2; shift; done
[ "$id" = 1 ] && exit 3
trap 'echo stopped > {tmp_path}/done.$id; exit 0' TERM
while true; do sleep 0.1; done
''')
  result = subprocess.run([f"{REPO}/launch/local.sh", "configs/synthetic.py", "run"],
                          env={**env_with(tmp_path), "NUM_PROCESSES": "2"}, timeout=60)
  assert result.returncode == 3
  assert (tmp_path / "done.0").read_text() == "stopped\n"

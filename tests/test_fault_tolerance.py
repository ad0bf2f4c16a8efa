"""Fault tolerance on real processes and real files (issue 14):
- no orphans: SIGKILL of torchrun, of mpiexec, of the sbatch batch script or of srun (real Slurm)
  leaves no trainer alive within 10 s, and none starts a checkpoint on Slurm's teardown; SIGKILL of a
  trainer leaves none of its multiprocessing helpers alive (dist_checkpointing's spawned Manager server);
- one job per run directory: a second trainer is refused naming the holder; after the holder is
  SIGKILLed a new trainer takes the lock over and resumes; a race for a dead holder's lock has one winner;
- safe checkpoint loading: a truncated or bit-flipped file is refused by name and the previous
  checkpoint is used; a pickle with a code payload in a checkpoint directory is never executed;
  checkpoints without a manifest (written before manifests) still load."""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from parity import free_port
from test_training import environment, trainer_args

from megatron_vlm.training import checkpoint, integrity, run_lock

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
# No evaluation: these tests are about processes and files, not the validation splits.
COMMON = ("training.log_interval=1", "training.warmup_steps=1", "training.eval_interval=0")
LONG = ("training.train_steps=400", "training.save_interval=2", *COMMON)


def start(command, log: Path) -> subprocess.Popen:
    env = environment()
    for name in [n for n in env if n.startswith(("SLURM_", "MEGATRON_VLM_"))]:
        env.pop(name)
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_for_text(log: Path, text: str, process: subprocess.Popen | None = None, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = log.read_text()
        if text in content:
            return content
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before {text!r}:\n{content[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {text!r}:\n{log.read_text()[-4000:]}")


def alive(pids) -> list[int]:
    """Those of ``pids`` still running (zombies, waiting for a reaper, count as dead)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def trainer_processes(launcher_pid: int) -> list[psutil.Process]:
    return psutil.Process(launcher_pid).children(recursive=True)


@pytest.fixture(scope="module")
def scenario(data_root, tmp_path_factory):
    """The README's launcher (torchrun, one trainer) past two checkpoints, a second job started on its
    run directory, torchrun SIGKILLed, the newest checkpoint damaged (a truncated shard, a code payload
    as DCP metadata), a new job started on the directory, then that trainer SIGKILLed. What was seen
    is recorded; the tests below assert on it."""
    tmp = tmp_path_factory.mktemp("fault")
    run_dir = tmp / "run"
    seen = {"tmp": tmp, "run_dir": run_dir}
    overrides = (*LONG, "training.keep_last=3")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}"]
    launcher = start([*torchrun, *trainer_args(run_dir, data_root, *overrides)], tmp / "a.log")
    trainers: list[psutil.Process] = []
    try:
        wait_for_text(tmp / "a.log", "loading the tokenizer", launcher)  # it holds the lock from here on
        # Two ranks: rank 0 asks for the lock, both learn the answer (a collective).
        two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        second = start([*two, *trainer_args(run_dir, data_root, *overrides)], tmp / "b.log")
        wait_for_text(tmp / "a.log", f"saved {run_dir / 'checkpoints'}/iter_0000004", launcher)
        trainers = trainer_processes(launcher.pid)
        seen["trainer"] = next(p.pid for p in trainers if "megatron_vlm.train" in " ".join(p.cmdline()))
        seen["holder"] = json.loads((run_dir / "run.lock").read_text())
        second.wait(timeout=300)
        seen["second"] = (second.returncode, (tmp / "b.log").read_text())
        launcher.kill()  # SIGKILL
        launcher.wait()
        seen["orphans"] = left_after([p.pid for p in trainers], 10.0)
    finally:
        launcher.kill()
        for pid in alive([p.pid for p in trainers]):  # only on failure: never leave them running
            os.kill(pid, signal.SIGKILL)

    checkpoints = run_dir / "checkpoints"
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    previous = checkpoints / f"iter_{int(newest.name.removeprefix('iter_')) - 2:07d}"
    seen.update(newest=newest, previous=previous, marker=tmp / "payload-ran", pristine=tmp / "pristine")
    shutil.copytree(previous, seen["pristine"])
    shard = newest / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    (newest / "optimizer" / ".metadata").write_bytes(pickle.dumps(Payload(seen["marker"])))

    resumed = start([sys.executable, *trainer_args(run_dir, data_root, *overrides)], tmp / "c.log")
    try:
        step = int(previous.name.removeprefix("iter_"))
        seen["third"] = wait_for_text(tmp / "c.log", f"saved {checkpoints}/iter_{step + 2:07d}", resumed)
        seen["third_holder"] = json.loads((run_dir / "run.lock").read_text())["pid"], resumed.pid
        helpers = [p.pid for p in trainer_processes(resumed.pid)]
        seen["helpers"] = helpers
        resumed.kill()  # SIGKILL
        resumed.wait()
        seen["helpers_left"] = left_after(helpers, 10.0)
    finally:
        resumed.kill()
    return seen


def left_after(pids, within: float) -> list[str]:
    """Those of ``pids`` still alive ``within`` seconds from now (command lines), or [] as soon as none is."""
    deadline = time.time() + within
    while alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return [f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}" for pid in alive(pids)]


def test_sigkill_of_torchrun_leaves_no_trainer_alive(scenario):
    assert scenario["orphans"] == [], "alive 10 s after SIGKILL of torchrun"


def test_sigkill_of_a_trainer_leaves_none_of_its_helpers_alive(scenario):
    assert scenario["helpers"], "the trainer started no helper processes to check"
    assert scenario["helpers_left"] == [], "alive 10 s after SIGKILL of their trainer"


def test_a_second_job_is_refused_naming_the_holder_and_a_new_one_takes_over(scenario):
    host, trainer, run_dir = socket.gethostname(), scenario["trainer"], scenario["run_dir"]
    assert (scenario["holder"]["pid"], scenario["holder"]["host"]) == (trainer, host)
    code, log = scenario["second"]
    assert code != 0
    refusal = f"run directory {run_dir} is locked: in use by PID {trainer} on {host}"
    assert f"[rank0]: megatron_vlm.training.run_lock.RunDirectoryLocked: {refusal}" in log
    assert f"[rank1]: megatron_vlm.training.run_lock.RunDirectoryLocked: {refusal}" in log
    third = scenario["third"]
    assert f"taking over the lock left by PID {trainer} on {host}" in third
    assert f"PID {trainer} is no longer running" in third
    assert f"resumed from {scenario['previous']} at step" in third
    assert scenario["third_holder"][0] == scenario["third_holder"][1]


def test_a_damaged_newest_checkpoint_is_refused_by_name_and_the_previous_one_used(scenario):
    third = scenario["third"]
    assert f"checkpoint {scenario['newest']} is refused: " in third
    assert "model/__0_0.distcp: 1000 bytes, the manifest says" in third
    assert re.search(r"optimizer/\.metadata: \d+ bytes, the manifest says \d+", third)
    assert "optimizer/.metadata names" in third and "refused (it would run code when loaded)" in third
    assert f"resumed from {scenario['previous']} at step" in third
    assert not scenario["marker"].exists(), "the payload pickle was executed"


# --- the lock on its own: real processes, no training ----------------------------------------------


def take_lock_in_subprocess(directory: Path, hold: float = 0.0, force: bool = False) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from megatron_vlm.training import run_lock\n"
        "try:\n"
        f"    lock = run_lock.acquire({str(directory)!r}, force={force})\n"
        "except run_lock.RunDirectoryLocked as error:\n"
        "    print('REFUSED', error); sys.exit(3)\n"
        f"print('TOOK', flush=True); time.sleep({hold}); lock.release()\n"
    )
    env = {k: v for k, v in environment().items() if not k.startswith(("SLURM_", "MEGATRON_VLM_"))}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )


def dead_pid() -> tuple[int, int]:
    """A PID and start time of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    ticks = run_lock._process_start_ticks(process.pid)
    process.wait()
    return process.pid, ticks


def plant_lock(directory: Path, **fields) -> None:
    record = {**run_lock.this_process(), **fields}
    (directory / run_lock.LOCK_NAME).write_text(json.dumps(record))


def test_lock_refuses_live_holders_and_takes_over_dead_ones(tmp_path, caplog):
    held = run_lock.acquire(tmp_path)
    other = take_lock_in_subprocess(tmp_path)
    out = other.communicate(timeout=60)[0]
    assert other.returncode == 3 and f"is locked: in use by PID {os.getpid()} on {socket.gethostname()}" in out
    held.release()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()

    # Dead holder on this host: taken over.
    pid, ticks = dead_pid()
    plant_lock(tmp_path, pid=pid, pid_start_ticks=ticks)
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        taken = run_lock.acquire(tmp_path)
    assert f"taking over the lock left by PID {pid}" in caplog.text and "no longer running" in caplog.text
    taken.release()

    # A live PID with another start time: the holder's PID was reused, the holder is dead.
    plant_lock(tmp_path, pid=os.getppid(), pid_start_ticks=1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        run_lock.acquire(tmp_path).release()
    assert "now belongs to another process" in caplog.text

    # Another host, no Slurm job: cannot be checked, refused unless forced.
    plant_lock(tmp_path, host="elsewhere-node-17", pid=4242)
    with pytest.raises(run_lock.RunDirectoryLocked, match="liveness cannot be checked.*--force-unlock"):
        run_lock.acquire(tmp_path, force=False)
    forced = take_lock_in_subprocess(tmp_path, force=True)
    assert "TOOK" in forced.communicate(timeout=60)[0]


def test_a_race_for_a_dead_holders_lock_has_one_winner(tmp_path):
    pid, ticks = dead_pid()
    plant_lock(tmp_path, pid=pid, pid_start_ticks=ticks)
    contenders = [take_lock_in_subprocess(tmp_path, hold=1.5) for _ in range(4)]
    outputs = [c.communicate(timeout=120)[0] for c in contenders]
    assert sum("TOOK" in out for out in outputs) == 1, outputs
    assert sum("REFUSED" in out and "is locked: in use by PID" in out for out in outputs) == 3, outputs


# --- safe checkpoint loading ---------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_flipped_bytes_and_legacy_pickles_are_caught_without_running_them(scenario, tmp_path):
    marker = tmp_path / "payload-ran"
    # A flipped byte (same size) is found and named.
    flipped = tmp_path / "flipped"
    shutil.copytree(scenario["pristine"], flipped)
    assert json.loads((flipped / "manifest.json").read_text())["files"].keys() == set(
        integrity.checkpoint_files(flipped)
    )
    assert checkpoint.verify_checkpoint(flipped) == ([], True)
    target = max((flipped / "model").glob("*.distcp"), key=lambda path: path.stat().st_size)  # layouts vary
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    problems, has_manifest = checkpoint.verify_checkpoint(flipped)
    assert has_manifest and problems == [f"model/{target.name}: checksum mismatch (corrupted or altered)"]

    # Written before manifests: loads (the caller warns), unless a pickle names code, which is refused
    # without being executed: in our per-rank file (weights_only) or in the library's DCP metadata.
    legacy = tmp_path / "legacy"
    shutil.copytree(scenario["pristine"], legacy)
    (legacy / "manifest.json").unlink()
    assert checkpoint.verify_checkpoint(legacy) == ([], False)
    assert set(integrity.load_rank_file(legacy / "rank00000.pt")) == {"rng", "iteration"}  # the data state: data.json
    import torch

    torch.save({"rng": Payload(marker)}, legacy / "rank00000.pt")
    (legacy / "model" / ".metadata").write_bytes(pickle.dumps({"x": Payload(marker)}))
    problems, _ = checkpoint.verify_checkpoint(legacy)
    assert any(p.startswith("rank00000.pt names") and "refused" in p for p in problems), problems
    assert any("model/.metadata names" in p and "refused" in p for p in problems), problems
    with pytest.raises(integrity.UnsafePickle, match="rank00000.pt"):
        integrity.load_rank_file(legacy / "rank00000.pt")
    with pytest.raises(integrity.UnsafePickle, match=r"\.metadata"):
        integrity.check_library_pickles(legacy)
    assert not marker.exists()


# --- the sbatch path: real Slurm ---------------------------------------------------------------------


def _job_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("SLURM_JOB_ID")
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _command_line(process: psutil.Process) -> str:
    """'' for a process that is gone or a zombie (other tests' processes come and go meanwhile)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


@pytest.mark.slurm
def test_sigkill_of_the_batch_script_leaves_no_trainer_alive(slurm, data_root, tmp_path, monkeypatch):
    """Also: a lock held on another host by a Slurm job is judged by asking Slurm (running: refused;
    over: taken over)."""
    from test_slurm import submit, wait_for

    run_dir = tmp_path / "run"
    # No checkpoint before the kill: any checkpoint found afterwards was begun because of it.
    overrides = " ".join(("training.train_steps=400", "training.save_interval=1000", *COMMON))
    job, env = submit(slurm, run_dir, data_root, overrides)
    logs = run_dir / "logs"
    try:
        wait_for(
            lambda: logs.is_dir() and any("step      3/400" in p.read_text() for p in logs.glob("*.log")), 600, "steps"
        )
        script = next(p for p in psutil.process_iter() if f"job{int(job):05d}/slurm_script" in _command_line(p))
        job_processes = [p for p in psutil.process_iter() if p.pid != script.pid and _job_of(p) == job]
        trainers = [p for p in job_processes if p.cmdline()[1:3] == ["-m", "megatron_vlm.train"]]
        assert len(trainers) == 2, job_processes
        pids = {p.pid for t in job_processes for p in [t, *t.children(recursive=True)]}  # srun and trainers
        monkeypatch.setenv("SLURM_CONF", slurm)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        plant_lock(elsewhere, host="other-node-3", pid=4242, slurm_job_id=job)
        with pytest.raises(run_lock.RunDirectoryLocked, match=f"Slurm job {job} is RUNNING"):
            run_lock.acquire(elsewhere)

        os.kill(script.pid, signal.SIGKILL)
        # srun gets SIGTERM (setpriv --pdeathsig) and SIGKILLs the trainers; should Slurm's teardown
        # SIGTERM reach them first, they learn from Slurm that the script has ended and exit. Either
        # way no checkpoint is written (the trainers used to take that SIGTERM for a preemption and
        # save first, outliving 10 s under load).
        assert left_after(pids, 10.0) == [], "alive 10 s after SIGKILL of the batch script"
        checkpoints = run_dir / "checkpoints"
        written = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        assert written == [], "a trainer took the launcher's death for a preemption and began a checkpoint"
        wait_for(
            lambda: run_lock.holder_liveness(json.loads((elsewhere / "run.lock").read_text()))[0] is False, 60, "Slurm"
        )
        run_lock.acquire(elsewhere).release()
    finally:
        subprocess.run(["scancel", "--signal=KILL", job], env=env, check=False)


# A trainer's signal handling without the model (torch only): it says when a SIGTERM arrives and when
# a checkpoint is asked for.
PREEMPTIBLE_STAND_IN = (
    "import os, signal, time\n"
    "from megatron_vlm.training.preemption import PreemptionHandler\n"
    "handler = PreemptionHandler()\n"
    "preemption = signal.getsignal(signal.SIGTERM)\n"
    "def arrived(number, frame):\n"
    "    print('got SIGTERM', flush=True)\n"
    "    preemption(number, frame)\n"
    "signal.signal(signal.SIGTERM, arrived)\n"
    "print('ready', os.getpid(), flush=True)\n"
    "while not handler.requested():\n"
    "    time.sleep(0.1)\n"
    "print('checkpoint requested', flush=True)\n"
    "time.sleep(600)\n"
)


def _srun_killed(slurm: str, directory: Path) -> tuple[str, str]:
    """One job of two stand-in tasks under srun, srun SIGKILLed once both are ready -> (its job id,
    the tasks' logs); asserted: every task gone within 10 s, none asked for a checkpoint."""
    from test_slurm import wait_for

    directory.mkdir()
    (directory / "stand_in.py").write_text(PREEMPTIBLE_STAND_IN)
    (directory / "job.sh").write_text(
        f"#!/bin/bash\nsrun --output={directory}/task-%t.log python {directory}/stand_in.py\n"
    )
    env = {
        **environment(),
        "SLURM_CONF": slurm,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for name in [n for n in env if n.startswith("SLURM_") and n != "SLURM_CONF"]:
        env.pop(name)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--time=10", f"--chdir={ROOT}"]
        + [f"--output={directory}/job.out", str(directory / "job.sh")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    job = submitted.stdout.strip().split(";")[0]
    logs = [directory / f"task-{task}.log" for task in (0, 1)]

    def text() -> str:
        return "".join(log.read_text() for log in logs if log.exists())

    try:
        wait_for(lambda: text().count("ready") == 2, 300, "the tasks")
        tasks = [int(line.split()[1]) for line in text().splitlines() if line.startswith("ready")]
        sruns = [p.pid for p in psutil.process_iter() if _job_of(p) == job and _command_line(p).startswith("srun")]
        assert sruns, "no srun found"
        for pid in sruns:
            os.kill(pid, signal.SIGKILL)
        assert left_after(tasks, 10.0) == [], f"alive 10 s after SIGKILL of srun:\n{text()}"
        assert "checkpoint requested" not in text(), text()
        return job, text()
    finally:
        subprocess.run(["scancel", "--signal=KILL", job], env=env, check=False)


@pytest.mark.slurm
def test_sigkill_of_srun_makes_the_tasks_exit_without_checkpointing(slurm, tmp_path):
    """srun SIGKILLed (the OOM killer's pick): the batch script ends, and Slurm's teardown SIGTERMs the
    tasks as a preemption would; they learn from Slurm that the launcher is gone and exit at once,
    naming why, instead of asking for a checkpoint. (That a preemption's SIGTERM still checkpoints:
    test_slurm.py, with the trainer.)

    Slurm's teardown SIGTERMs the tasks (about 9 times in 10 here), or its step daemon, seeing srun
    gone first, SIGKILLs them outright, when there is no reason to read: the job runs again (at most
    three times) until a SIGTERM arrived, so the reason is checked on at least one."""
    signalled = 0
    for attempt in range(3):
        job, text = _srun_killed(slurm, tmp_path / f"attempt-{attempt}")
        reason = f"Slurm job {job} is [A-Z_]+: its batch script exited with 137 \\(the launcher is gone\\)"
        # Every task that got the SIGTERM names the reason.
        assert len(re.findall(reason, text)) == text.count("got SIGTERM"), text
        signalled += text.count("got SIGTERM")
        if signalled:
            break
    assert signalled > 0, "no task got Slurm's SIGTERM in three jobs: the reason was never checked"


# --- the MPI path: what megatron_vlm.train arms first, under MPICH's mpiexec (no torch: fast) ----------

# Each rank's line in one write (below PIPE_BUF, so atomic): print() of several values writes them
# piece by piece, and the two ranks' pieces interleaved on the shared pipe ("PMI_RANKPMI_RANK").
RANK_STAND_IN = (
    "import os, sys, time\n"
    "from megatron_vlm.training import lifecycle\n"
    "os.write(sys.stdout.fileno(), f'{lifecycle.arm_trainer()} {os.getpid()}\\n'.encode())\n"
    "time.sleep(120)\n"
)


def test_sigkill_of_mpiexec_leaves_no_rank_alive():
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists(), f"no mpiexec at {mpiexec}: the 'test' extra installs mpich (pip install -e '.[test]')"
    launcher = subprocess.Popen(
        [str(Path(sys.executable).parent / "mpiexec"), "-n", "2", sys.executable, "-c", RANK_STAND_IN],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in environment().items() if not k.startswith(("SLURM_", "MEGATRON_VLM_"))},
        cwd=ROOT,
    )
    pids = []
    try:
        for _ in range(2):
            reason, pid = launcher.stdout.readline().split()
            assert reason == "PMI_RANK"  # armed because MPICH's launcher started it
            pids.append(int(pid))
        launcher.kill()  # SIGKILL
        launcher.wait()
        assert left_after(pids, 10.0) == [], "alive 10 s after SIGKILL of mpiexec"
    finally:
        launcher.kill()
        for pid in alive(pids):
            os.kill(pid, signal.SIGKILL)

"""Phase 4's compiled programs (`inst/`), artifact integrity, crash safety and concurrent compiles, on a tiny
Llama: the exported programs give the traced programs' tokens without tracing the model, a corrupted or
truncated file is an error naming it, kill -9 at any phase leaves nothing half-written that loads, and two
compiles of one model both succeed."""

import collections
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.experimental import serialize_executable

import hdex_jax.forward
from hdex_jax import artifacts, executable_cache, exported_programs, generation, hub
from hdex_jax.cli import main
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM
from tests.compilations import counting_compilations
from tests.helpers_tiny import save_tiny_checkpoint, save_tiny_tokenizer, write_tiny_gguf

# One bucket (prompt 16, cache 32): three programs, so every compile here is quick.
MAX_LENGTH = 32
PROMPT = [3, 17, 42, 9, 5]
GREEDY = dict(max_new_tokens=8, do_sample=False)
SAMPLED = dict(max_new_tokens=8, do_sample=True, top_k=0, top_p=0.9, temperature=1.3, seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(home, checkpoint):
    return AutoCompiler().compile(checkpoint, num_device=2, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def traced(model_dir, checkpoint):
    """Tokens of the traced programs (the model with its exported programs taken away)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    model.decode = dataclasses.replace(model.decode, programs=None)
    return {"greedy": model.generate(PROMPT, **GREEDY), "sampled": model.generate(PROMPT, **SAMPLED),
            "streamed": list(model.generate_yield(PROMPT, **SAMPLED))}


def test_inst_holds_programs_and_manifest(model_dir):
    directory = artifacts.inst_dir(model_dir, 2)
    manifest = artifacts.read_manifest(directory)
    assert manifest["jax"] == jax.__version__ and manifest["platform"] == jax.default_backend()
    assert manifest["mesh_shape"] == {"lpu": 2} and manifest["max_length"] == MAX_LENGTH
    assert manifest["buckets"] == [{"batch": 1, "prompt": 16, "cache": 32, "stop_slots": 4}]
    files = sorted(p.name for p in directory.iterdir() if p.name != artifacts.COMPLETE)
    assert files == sorted(manifest["programs"]) == sorted(manifest["files"]) == [
        f"{name}-b1-t16-s32-k4.jaxexport" for name in ("advance", "generate", "start")]
    start = manifest["programs"]["start-b1-t16-s32-k4.jaxexport"]
    assert start["program"] == "start" and [[1, 16], "int32"] in start["inputs"]  # the prompt tokens and mask
    assert [[1, 16], "int32"] in manifest["programs"]["generate-b1-t16-s32-k4.jaxexport"]["outputs"]  # new tokens
    for name, record in manifest["files"].items():
        assert record["size"] == (directory / name).stat().st_size


def test_exported_programs_give_the_traced_tokens_without_tracing(model_dir, checkpoint, traced, monkeypatch):
    def no_tracing(*args, **kwargs):
        raise AssertionError("the model's Python code was traced")

    monkeypatch.setattr(hdex_jax.forward, "_forward", no_tracing)
    for name in ("_loop", "_advance_jit"):
        monkeypatch.setattr(generation, name, no_tracing)
    for name in ("_start", "_generate"):  # jitted per prompt bucket: `[plan]` is the program
        monkeypatch.setattr(generation, name, collections.defaultdict(lambda: no_tracing))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    assert model.generate(PROMPT, **GREEDY) == traced["greedy"]
    assert model.generate(PROMPT, **SAMPLED) == traced["sampled"]
    assert list(model.generate_yield(PROMPT, **SAMPLED)) == traced["streamed"]
    # A shape the compile did not export (two rows) traces, which the patch above catches: the check can fail.
    with pytest.raises(AssertionError, match="traced"):
        model.generate([PROMPT, PROMPT], **GREEDY)


def test_other_jax_version_is_said_once_and_traces_the_same_tokens(model_dir, checkpoint, traced, monkeypatch,
                                                                   capsys):
    here = exported_programs.environment()
    monkeypatch.setattr(exported_programs, "environment", lambda: {**here, "jax": "0.0.1"})
    models = [AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}) for _ in range(2)]
    printed = capsys.readouterr().out
    assert printed.count("tracing the programs instead") == 1 and "0.0.1" in printed
    assert all(m.decode.programs is None for m in models)
    assert models[0].generate(PROMPT, **GREEDY) == traced["greedy"]
    assert models[1].generate(PROMPT, **SAMPLED) == traced["sampled"]


def _run_all(model) -> dict:
    return {"greedy": model.generate(PROMPT, **GREEDY), "sampled": model.generate(PROMPT, **SAMPLED),
            "streamed": list(model.generate_yield(PROMPT, **SAMPLED))}


def _executables(model_dir: Path) -> list[Path]:
    return sorted(executable_cache.xla_cache_dir(artifacts.inst_dir(model_dir, 2)).glob("lpu2-*.xla"))


def test_a_process_loads_the_stored_executables_and_compiles_nothing(model_dir, checkpoint, traced):
    # The first use of each program on this machine compiles it and stores the executable beside the model...
    AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}).generate(PROMPT, **GREEDY)
    list(AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}).generate_yield(PROMPT, **GREEDY))
    assert [p.name.rsplit("-", 1)[0] for p in _executables(model_dir)] == [
        f"lpu2-{name}-b1-t16-s32-k4" for name in ("advance", "generate", "start")]
    # ...and a later load (a new process reads the same files) runs them without compiling anything.
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    with counting_compilations() as compiled:
        assert _run_all(model) == traced
    assert compiled == []


def test_from_pretrained_prefetches_the_executable_used_last(model_dir, checkpoint, traced):
    list(AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}).generate_yield(PROMPT, **GREEDY))
    # As if the last process had streamed: "advance" was used last, the others a minute before.
    stored = {path.name.split("-")[1]: path for path in _executables(model_dir)}
    a_minute_ago = stored["advance"].stat().st_mtime_ns - 60 * 10**9
    for name in ("start", "generate"):
        os.utime(stored[name], ns=(a_minute_ago, a_minute_ago))
    mtimes = {path: path.stat().st_mtime_ns for path in stored.values()}
    guessing = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    [guess] = [e for e in guessing.decode.programs._executables.values() if e._prefetching is not None]
    guess._prefetching.join()
    assert guess.name == "advance" and guess._loaded is not None
    # A guess is not a use: the prefetched file keeps its time, and generate (used next) becomes the last used.
    assert {path: path.stat().st_mtime_ns for path in stored.values()} == mtimes
    guessing.generate(PROMPT, **GREEDY)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    prefetched = {name: e for name, e in model.decode.programs._executables.items() if e._prefetching is not None}
    assert list(prefetched) == ["generate-b1-t16-s32-k4.jaxexport"]
    prefetched["generate-b1-t16-s32-k4.jaxexport"]._prefetching.join()
    assert prefetched["generate-b1-t16-s32-k4.jaxexport"]._loaded is not None  # loaded before any call
    with counting_compilations() as compiled:
        assert model.generate(PROMPT, **GREEDY) == traced["greedy"]
    assert compiled == []
    # Streaming loads `start` and then `advance`: the next process prefetches `advance`.
    list(model.generate_yield(PROMPT, **GREEDY))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    assert [name for name, e in model.decode.programs._executables.items() if e._prefetching is not None] == [
        "advance-b1-t16-s32-k4.jaxexport"]


def test_a_damaged_executable_is_compiled_again_never_run(model_dir, checkpoint, traced, capsys):
    AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}).generate(PROMPT, **GREEDY)
    stored = next(p for p in _executables(model_dir) if "-generate-" in p.name)
    _damage(stored, "flip")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    with counting_compilations() as compiled:
        assert model.generate(PROMPT, **GREEDY) == traced["greedy"]
    assert len(compiled) == 1 and f"{stored} is damaged; compiling the program again" in capsys.readouterr().out
    # The compile stored a whole executable again: the next load compiles nothing.
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    with counting_compilations() as compiled:
        assert model.generate(PROMPT, **GREEDY) == traced["greedy"]
    assert compiled == []


def test_an_executable_that_does_not_load_here_is_compiled_again(model_dir, checkpoint, traced, capsys,
                                                                  monkeypatch):
    AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}).generate(PROMPT, **GREEDY)

    def refuse(*args, **kwargs):  # what XLA says of an executable compiled for another CPU
        raise RuntimeError("Machine type used for XLA:CPU compilation doesn't match the machine type for execution")

    monkeypatch.setattr(serialize_executable, "deserialize_and_load", refuse)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2})
    with counting_compilations() as compiled:
        assert model.generate(PROMPT, **GREEDY) == traced["greedy"]
    assert len(compiled) == 1 and "does not load here (Machine type used" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ integrity

def _damage(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    if how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    else:
        path.write_bytes(data[: len(data) - 100])
    return data


@pytest.mark.parametrize("artifact,name,how", [
    ("param", artifacts.WEIGHTS_FILE, "flip"), ("param", artifacts.WEIGHTS_FILE, "truncate"),
    ("ckpt", artifacts.WEIGHTS_FILE, "flip"), ("ckpt", "tokenizer.json", "flip"),
    ("inst", "generate-b1-t16-s32-k4.jaxexport", "flip")])
def test_corrupted_or_truncated_file_is_an_error_naming_it(model_dir, checkpoint, artifact, name, how):
    directory = {"param": artifacts.param_dir(model_dir, 2), "ckpt": artifacts.ckpt_dir(model_dir),
                 "inst": artifacts.inst_dir(model_dir, 2)}[artifact]
    original = _damage(directory / name, how)
    try:
        for verify in ("cheap", "full"):
            with pytest.raises(artifacts.ArtifactError, match=rf"{directory / name}.*force=True.*--force"):
                AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}, verify=verify)
    finally:
        (directory / name).write_bytes(original)


def test_force_recompile_repairs_a_corrupted_file(home, tmp_path, traced):
    directory = save_tiny_checkpoint("llama", tmp_path / "tiny-repaired")
    model_dir = AutoCompiler().compile(str(directory), num_device=2, max_length=MAX_LENGTH)
    _damage(artifacts.param_dir(model_dir, 2) / artifacts.WEIGHTS_FILE, "flip")
    with pytest.raises(artifacts.ArtifactError):
        AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 2})
    assert main(["compile", str(directory), "--num-device", "2", "--max-length", str(MAX_LENGTH), "--force"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 2}, verify="full")
    assert model.generate(PROMPT, **GREEDY) == traced["greedy"]


def test_cheap_check_reads_the_edges_of_large_files_and_the_full_check_every_byte(tmp_path, monkeypatch):
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * artifacts.EDGE))
    manifest = {"files": artifacts.file_records(tmp_path)}
    for offset, cheap_catches in ((10, True), (3 * artifacts.EDGE - 10, True), (3 * artifacts.EDGE // 2, False)):
        data = bytearray((tmp_path / "big.bin").read_bytes())
        data[offset] ^= 0xFF
        (tmp_path / "big.bin").write_bytes(data)
        if cheap_catches:
            with pytest.raises(artifacts.ArtifactError, match="big.bin is corrupted"):
                artifacts.verify(tmp_path, manifest, "cheap", "remedy")
        else:  # documented: a flipped byte in the middle of a large file needs the full check
            artifacts.verify(tmp_path, manifest, "cheap", "remedy")
        with pytest.raises(artifacts.ArtifactError, match="big.bin is corrupted"):
            artifacts.verify(tmp_path, manifest, "full", "remedy")
        data[offset] ^= 0xFF
        (tmp_path / "big.bin").write_bytes(data)
    monkeypatch.setenv("HDEX_VERIFY", "full")
    assert artifacts.verify_level(None) == "full" and artifacts.verify_level("cheap") == "cheap"
    monkeypatch.setenv("HDEX_VERIFY", "fast")
    with pytest.raises(ValueError, match="HDEX_VERIFY"):
        artifacts.verify_level(None)
    with pytest.raises(ValueError, match="verify"):
        artifacts.verify_level("quick")


# ----------------------------------------------------------------------------- crash safety and concurrency

# A compile in a child process that stops at a chosen point (the n-th call of a function), says so on stdout
# and waits there, holding the model's lock, to be killed with SIGKILL.
_WORKER = textwrap.dedent("""
    import os, sys, time
    from hdex_jax import artifacts
    from hdex_jax.tools import AutoCompiler

    checkpoint, point, nth, force = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "force"
    if point != "none":
        original, calls = getattr(artifacts, point), []

        def stop_here(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(1)
            if len(calls) == nth:
                print("STOPPED", flush=True)
                time.sleep(600)
            return result

        setattr(artifacts, point, stop_here)
    AutoCompiler().compile(checkpoint, num_device=2, max_length=%d, force=force)
    print("FINISHED", flush=True)
""" % MAX_LENGTH)


def _start_worker(checkpoint: str, point: str = "none", nth: int = 1, force: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, checkpoint, point, str(nth),
                             "force" if force else "no"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


def _kill_when_stopped(worker: subprocess.Popen) -> None:
    for line in worker.stdout:
        if line.strip() == "STOPPED":
            break
    else:
        raise AssertionError(f"the worker ended before its stopping point (exit {worker.wait()})")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()


# (function, its n-th call): where the compile is killed. write_ckpt: the checkpoint's weights are written, its
# manifest not; file_records 2 and 3: the weight layout's / the programs' files are written, their manifests
# not; write_manifest 3: the programs' manifest is written in the scratch directory, not yet renamed in.
KILL_POINTS = [("write_ckpt", 1), ("file_records", 2), ("file_records", 3), ("write_manifest", 3)]


@pytest.mark.parametrize("point,nth", KILL_POINTS)
def test_kill_9_at_any_phase_leaves_nothing_loadable_and_a_rerun_resumes(home, tmp_path, traced, point, nth):
    directory = save_tiny_checkpoint("llama", tmp_path / f"tiny-killed-{point}-{nth}")
    checkpoint = str(directory)
    _kill_when_stopped(_start_worker(checkpoint, point, nth))
    model_dir = hub.model_dir(checkpoint)
    done = [artifacts.read_manifest(d) is not None for d in (
        artifacts.ckpt_dir(model_dir), artifacts.param_dir(model_dir, 2), artifacts.inst_dir(model_dir, 2))]
    # Everything before the kill point is complete, nothing after it exists as a loadable directory.
    finished_before = {"write_ckpt": 0, "file_records": nth - 1, "write_manifest": nth - 1}[point]
    assert done == [i < finished_before for i in range(3)]
    for complete, d in zip(done, (artifacts.ckpt_dir(model_dir), artifacts.param_dir(model_dir, 2),
                                  artifacts.inst_dir(model_dir, 2))):
        assert complete or not d.exists()
    worker = _start_worker(checkpoint)
    out = worker.communicate()[0]
    assert worker.returncode == 0 and "FINISHED" in out and "left by a compile that was killed" in out
    assert ("already converted" in out) == done[0]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}, verify="full")
    assert model.generate(PROMPT, **GREEDY) == traced["greedy"]


def test_kill_9_during_a_forced_recompile_keeps_the_previous_artifacts(model_dir, checkpoint, traced):
    before = {d: artifacts.read_manifest(d) for d in (artifacts.param_dir(model_dir, 2),
                                                      artifacts.inst_dir(model_dir, 2))}
    param_inode = artifacts.param_dir(model_dir, 2).stat().st_ino
    _kill_when_stopped(_start_worker(checkpoint, "file_records", 3, force=True))
    # The forced compile replaced ckpt/ and param/ (whole, each in one rename) and was killed before inst/.
    assert artifacts.param_dir(model_dir, 2).stat().st_ino != param_inode
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}, verify="full")
    assert model.generate(PROMPT, **GREEDY) == traced["greedy"]
    assert artifacts.read_manifest(artifacts.inst_dir(model_dir, 2)) == before[artifacts.inst_dir(model_dir, 2)]


def test_a_compile_in_progress_holds_readers_off_until_it_ends(model_dir, checkpoint, traced):
    worker = _start_worker(checkpoint, "file_records", 2, force=True)
    try:
        for line in worker.stdout:
            if line.strip() == "STOPPED":
                break
        fd = os.open(model_dir / artifacts.LOCK_FILE, os.O_RDWR)
        try:  # the shared lock from_pretrained takes is refused while the compile runs
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}, verify="full")
    assert model.generate(PROMPT, **GREEDY) == traced["greedy"]


def test_two_concurrent_compiles_both_succeed_with_one_consistent_result(home, tmp_path, traced):
    directory = save_tiny_checkpoint("llama", tmp_path / "tiny-concurrent")
    workers = [_start_worker(str(directory)) for _ in range(2)]
    outs = [w.communicate()[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0] and all("FINISHED" in out for out in outs)
    # One converted and exported; the other waited for the lock and reused all of it.
    assert sorted("already compiled" in out for out in outs) == [False, True]
    model = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 2}, verify="full")
    assert model.decode.programs is not None
    assert model.generate(PROMPT, **GREEDY) == traced["greedy"]


# --------------------------------------------------------------------------------- low_memory_usage, fast_compile

def test_low_memory_usage_deletes_only_what_hdex_downloaded(home, tmp_path):
    downloaded = home / "downloads" / "tiny-low-memory.gguf"
    write_tiny_gguf(downloaded)
    try:
        AutoCompiler().compile(str(downloaded), max_length=MAX_LENGTH, low_memory_usage=True)
        assert not downloaded.exists()
    finally:
        downloaded.unlink(missing_ok=True)
    mine = tmp_path / "mine.gguf"
    write_tiny_gguf(mine)
    AutoCompiler().compile(str(mine), max_length=MAX_LENGTH, low_memory_usage=True)
    assert mine.is_file()


def test_fast_compile_exports_the_common_buckets_and_full_compile_all(home, tmp_path):
    fast, full = exported_programs.buckets(4096, fast_compile=True), exported_programs.buckets(4096, fast_compile=False)
    assert {(b.prompt, b.cache) for b in fast} == {(t, f * t) for t in (16, 32, 64, 128) for f in (2, 4)}
    assert set(fast) < set(full) and max(b.prompt for b in full) == 2048
    assert all(b.cache <= 4096 and b.batch == 1 for b in full)
    directory = save_tiny_checkpoint("llama", tmp_path / "tiny-full-compile")
    model_dir = AutoCompiler().compile(str(directory), num_device=1, max_length=2 * MAX_LENGTH, fast_compile=False)
    manifest = artifacts.read_manifest(artifacts.inst_dir(model_dir, 1))
    assert {(b["prompt"], b["cache"]) for b in manifest["buckets"]} == {(16, 32), (16, 64), (32, 64)}
    # fast_compile=False also compiled every program and stored its executable beside the model.
    stored = sorted(p.name for p in executable_cache.xla_cache_dir(artifacts.inst_dir(model_dir, 1)).glob("lpu1-*.xla"))
    assert [name.rsplit("-", 1)[0] for name in stored] == sorted(f"lpu1-{Path(p).stem}" for p in manifest["programs"])


# --------------------------------------------------------------------------------------------- quick tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<s>system\nYou are helpful.</s>\n' }}{% endif %}"
          "{{ '<s>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


def test_quick_tokenizer_equals_transformers(tmp_path):
    import transformers

    from hdex_jax.transformers.tokenizer import Tokenizer

    directory = save_tiny_tokenizer(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    ours, theirs = Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    chat = [{"role": "user", "content": "héllo wörld, 2 + 2?"}]
    for add in (True, False):
        for tokenize in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=add, tokenize=tokenize) == \
                theirs.apply_chat_template(chat, add_generation_prompt=add, tokenize=tokenize, return_dict=False)
    ids = ours.encode("héllo wörld </s> again")
    assert ids == theirs.encode("héllo wörld </s> again")
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_id == theirs.eos_token_id  # anything else is transformers' tokenizer's

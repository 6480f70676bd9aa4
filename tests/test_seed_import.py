"""The seed's model.pth without torch: logits against PyTorch's (fixtures made by
tests/fixtures/make_seed_fixture.py), the run directory it becomes, and every file it must refuse."""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from script_runner import assert_one_line_error, run

from orpheus_jax import OrpheusError
from orpheus_jax.model import forward
from orpheus_jax.seed_import import read_torch_file, seed_to_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
SEED_MODEL = os.path.join(FIXTURES, "seed_model.pth")  # torch.save(model): the seed's format
SEED_STATE_DICT = os.path.join(FIXTURES, "seed_state_dict.pth")
SIZES = dict(vocab_size=66, n_layer=2, n_head=2, n_embd=32, block_size=16)


def torch_reference():
    ref = np.load(os.path.join(FIXTURES, "seed_logits.npz"))
    return ref["tokens"].astype(np.int32), ref["logits"]


def seed_model_cfg():
    from orpheus_jax.model import GPTConfig

    return GPTConfig(**SIZES, attn_scale="embd")


@pytest.mark.parametrize("path", [SEED_MODEL, SEED_STATE_DICT], ids=["whole_module", "state_dict"])
def test_logits_equal_pytorch(path):
    shape, params = seed_to_params(read_torch_file(path))
    assert shape == SIZES
    tokens, torch_logits = torch_reference()
    diff = np.abs(np.asarray(forward(seed_model_cfg(), params, tokens)) - torch_logits).max()
    print(
        f"{os.path.basename(path)}: max |ours - torch| = {diff:.2e} over logits of shape {torch_logits.shape}"
    )
    assert diff < 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory, iliad_path):
    workdir = str(tmp_path_factory.mktemp("seed") / "run")
    result = run("import_seed.py", SEED_MODEL, "--workdir", workdir, "--text", iliad_path)
    assert result.returncode == 0, result.stderr
    return workdir, result


@pytest.mark.slow
def test_import_writes_a_run_that_loads_like_any(imported):
    from orpheus_jax.checkpoint import load_run

    workdir, result = imported
    assert "2 layers, 2 heads, 32 dims, block 16, vocabulary 66" in result.stdout
    run_ = load_run(workdir)
    assert run_.step == 0 and run_.cfg.attn_scale == "embd" and run_.cfg.learning_rate == 1e-3
    assert {k: run_.cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == {
        k: SIZES[k] for k in ("n_layer", "n_head", "n_embd", "block_size")
    }
    tokens, torch_logits = torch_reference()
    assert np.abs(np.asarray(forward(run_.model_cfg, run_.params, tokens)) - torch_logits).max() < 1e-4


@pytest.mark.slow
def test_sample_py_reads_the_imported_run(imported):
    result = run(
        "sample.py",
        "--workdir",
        imported[0],
        "--prompt",
        "Achilles",
        "--max_new_tokens",
        "40",
        "--temperature",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Achilles") and len(result.stdout) == len("Achilles") + 40 + 1


@pytest.mark.slow
def test_train_py_fine_tunes_the_imported_run(imported, small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(imported[0], workdir)
    overrides = [f"--config.{k}={SIZES[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size")]
    result = run(
        "train.py",
        "--config",
        os.path.join(REPO, "configs", "orpheus_seed.py"),
        *overrides,
        "--workdir",
        workdir,
        "--data",
        small_text_path,
        "--config.batch_size=8",
        "--config.max_iters=2",
        "--config.eval_interval=2",
        "--config.eval_iters=1",
        "--config.checkpoint_interval=2",
        "--config.log_interval=1",
        "--config.cpu_dots=xla",
    )
    assert result.returncode == 0, result.stderr
    assert "resuming from step 0" in result.stdout and "Done: step 2" in result.stdout
    evals = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]


def write_pickle_zip(path, pkl: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())


def tensor_pickle(size: str, stride: str) -> bytes:
    """A hand-written pickle of one float tensor on storage 0 (4 elements), as torch.save spells it."""
    storage = b"(S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI4\ntQ"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + storage
        + b"I0\n("
        + size.encode()
        + b"t("
        + stride.encode()
        + b"tI00\nccollections\nOrderedDict\n)Rt"
        + b"R."
    )


@pytest.mark.slow
def test_a_pickle_naming_os_system_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "model.pth"
    write_pickle_zip(evil, f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    result = run("import_seed.py", str(evil), "--workdir", str(tmp_path / "run"), "--text", __file__)
    assert_one_line_error(result, "os.system", "nothing was executed")
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "run" / "config.json")


@pytest.mark.slow
@pytest.mark.parametrize(
    "pkl, words",
    [
        (b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval"),
        (b"c__builtin__\ngetattr\n(S'x'\nS'y'\ntR.", "__builtin__.getattr"),
        (b"c__main__\nEvil\n)\x81.", "__main__.Evil"),
        (b"ctorch\nload\n(S'x'\ntR.", "torch.load"),
        (
            b"\x80\x02ctorch.nn.modules.linear\nLinear\nK\x01\x85R.",
            "TypeError",
        ),  # a stub called with arguments
        (b"\x80\x02K\x01.", "neither a pickled model nor a state_dict"),
        (
            b"\x80\x02(X\x07\x00\x00\x00storageK\x00X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ.",
            "persistent record",
        ),
        (
            tensor_pickle("I1000000\nI1000000\n", "I0\nI0\n"),
            "does not fit its storage",
        ),  # a broadcast view: no huge copy
        (tensor_pickle("I5\n", "I1\n"), "does not fit its storage"),
        (
            tensor_pickle("I2\nI2\n", "I1\nI2\n"),
            "neither a pickled model nor a state_dict",
        ),  # a tensor, but alone
    ],
)
def test_other_pickles_are_one_line_errors(tmp_path, pkl, words):
    path = tmp_path / "model.pth"
    write_pickle_zip(path, pkl)
    with pytest.raises(OrpheusError, match=words.replace(".", r"\.")) as e:
        read_torch_file(str(path))
    assert "\n" not in str(e.value)


def test_a_hand_written_state_dict_with_a_strided_tensor(tmp_path):
    """torch.save keeps a view's strides: a transposed 2 x 2 over storage [0, 1, 2, 3]."""
    path = tmp_path / "state_dict.pth"
    write_pickle_zip(
        path, b"ccollections\nOrderedDict\n)R(S'w'\n" + tensor_pickle("I2\nI2\n", "I1\nI2\n")[:-1] + b"u."
    )
    state = read_torch_file(str(path))
    np.testing.assert_array_equal(state["w"], [[0, 2], [1, 3]])


@pytest.mark.slow
def test_truncated_and_corrupt_files(tmp_path):
    data = open(SEED_MODEL, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    assert_one_line_error(
        run("import_seed.py", str(truncated), "--workdir", str(tmp_path / "run")),
        "not a torch.save zip archive",
    )
    corrupt = tmp_path / "corrupt.pth"  # a flipped byte inside a storage: the zip's CRC catches it
    with zipfile.ZipFile(SEED_MODEL) as z:
        info = z.getinfo("seed_model/data/0")
    name_len, extra_len = np.frombuffer(data[info.header_offset + 26 : info.header_offset + 30], "<u2")
    at = info.header_offset + 30 + int(name_len) + int(extra_len) + 10  # into the stored bytes
    corrupt.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    with pytest.raises(OrpheusError, match="truncated or corrupt"):
        read_torch_file(str(corrupt))
    with pytest.raises(OrpheusError, match="no such file"):
        read_torch_file(str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_another_architecture_is_refused(tmp_path):
    # Karpathy's gpt.py names (ln1, ln2, ln_f, proj): the seed renamed them.
    result = run(
        "import_seed.py", os.path.join(FIXTURES, "other_arch.pth"), "--workdir", str(tmp_path / "run")
    )
    assert_one_line_error(result, "not the seed's architecture", "missing", "unexpected")
    state = read_torch_file(SEED_STATE_DICT)
    cases = [
        ({k: v for k, v in state.items() if k != "blocks.1.lnm2.bias"}, "missing blocks.1.lnm2.bias"),
        ({**state, "blocks.0.sa.gate.weight": np.zeros(3)}, "unexpected blocks.0.sa.gate.weight"),
        ({**state, "lm_head.bias": np.zeros(65, np.float32)}, "lm_head.bias has shape (65,), expected (66,)"),
        (
            {**state, "blocks.0.sa.heads.1.tril": np.ones((16, 16), np.float32)},
            "tril buffer is not the causal mask",
        ),
        ({k: v for k, v in state.items() if not k.startswith("blocks.")}, "no blocks.N.sa.heads.M"),
    ]
    for bad, words in cases:
        with pytest.raises(
            OrpheusError, match=words.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")
        ):
            seed_to_params(bad)


@pytest.mark.slow
def test_vocabulary_must_match_the_text_and_a_run_is_never_overwritten(imported, tmp_path, iliad_path):
    from configs import orpheus_seed
    from orpheus_jax.seed_import import import_seed

    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    with pytest.raises(OrpheusError, match="has 4 distinct characters but the model's vocabulary has 66"):
        import_seed(SEED_MODEL, str(tmp_path / "run"), str(short), orpheus_seed.get_config())
    with pytest.raises(OrpheusError, match="already holds a run"):
        import_seed(SEED_MODEL, imported[0], iliad_path, orpheus_seed.get_config())

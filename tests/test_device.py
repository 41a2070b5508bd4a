"""Every platform's decisions, proven on a CPU. Tests named test_mocked_* never ran on that
hardware: the device's properties (compute capability, name, availability, count) are faked
and the decision is asserted. The rest run the CPU code paths that stand in for a GPU's
(bfloat16 autocast, the CPU gradient scaler, fused AdamW's on-device skip)."""

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from config import GREEDY, RunOptions, Sampler, TinyLLMError, TrainConfig, default_preset
from conftest import complex_rope, fixed_batch, rope_angles, tiny_model_config, tiny_train_config
from model import GPT, apply_rope
from optim import make_optimizer
import sampling
import train

from machinery import ddp
from machinery import device as device_module
from machinery import records
from machinery.checkpoint import load_checkpoint, load_model, save_checkpoint
from machinery.device import autocast, choose_device, make_scaler, peak_flops, resolve_dtype
from machinery.sources import start_ids

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def fake_gpu(monkeypatch, fake_machine):
    """Pretend a CUDA GPU is present: set(name, capability, count) picks which one."""
    def set_gpu(name, capability, count=1):
        fake_machine(cuda=True, gpus=count)
        monkeypatch.setattr(device_module, "gpu", lambda *a: (name, capability))
    return set_gpu


@pytest.fixture
def matmul_precision():
    """torch's float32 matmul precision at its default, 'highest', and put back as it was after the test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("name, capability, dtype", [
    ("Tesla T4", (7, 5), "float16"),
    ("Tesla V100-SXM2-16GB", (7, 0), "float16"),
    ("NVIDIA L4", (8, 9), "bfloat16"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bfloat16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bfloat16"),
])
def test_mocked_gpu_decisions(fake_gpu, name, capability, dtype):
    fake_gpu(name, capability)
    device = choose_device("auto")
    assert device.type == "cuda" and default_preset(device.type) == "small"
    assert resolve_dtype("auto", device) == dtype  # a T4's float16 trains with its scaler: test_gpu.py
    if dtype != "float16":
        assert make_scaler(device, dtype) is None


def test_mocked_gpu_machine_trains_device_cpu_with_the_cpus_preset(fake_gpu):
    """Without --preset, the preset is that of the device the run trains on, --device's where it is given."""
    fake_gpu("Tesla T4", (7, 5))
    assert train.parse_flags([])[3] == "small"
    assert train.parse_flags(["--device", "cpu"])[3] == "tiny"


def test_mocked_t4_asking_for_bf16_warns_that_it_is_emulated(fake_gpu, capsys):
    fake_gpu("Tesla T4", (7, 5))
    assert resolve_dtype("bfloat16", CUDA) == "bfloat16"
    assert "emulated" in capsys.readouterr().err


def test_mocked_mac_decisions(fake_machine):
    fake_machine(cuda=False, mps=True, torch=(2, 8))
    mps = choose_device("auto")
    assert mps.type == "mps" and default_preset("mps") == "tiny"
    assert resolve_dtype("auto", mps) == "float32"
    scaler = make_scaler(mps, "float16")  # float16 on a Mac gets the MPS scaler, which is enabled
    assert scaler is not None and scaler.is_enabled()
    fake_machine(torch=(2, 7))  # whose scaler makes float64 on MPS
    with pytest.raises(TinyLLMError, match="torch 2.8 or later"):
        make_scaler(mps, "float16")


@pytest.mark.parametrize("works, dtype", [(True, "bfloat16"), (False, "float32")])
def test_mocked_mac_trains_in_the_precision_autocast_really_runs(monkeypatch, capsys, works, dtype):
    """torch 2.5's MPS autocast, or macOS 13's, turns bfloat16 off with a warning and trains in
    float32: the run says float32 then, not bfloat16."""
    assert device_module.autocast_works("cpu", "bfloat16")  # the question itself, asked of this torch
    monkeypatch.setattr(device_module, "autocast_works", lambda device_type, name: works)
    assert resolve_dtype("bfloat16", torch.device("mps")) == dtype
    assert ("training in float32" in capsys.readouterr().err) == (not works)


def test_mocked_no_cuda_float16_is_refused_where_no_scaler_works(monkeypatch):
    # a CUDA scaler without CUDA disables itself: that is exactly what silently corrupted weights
    # CUDA is hidden from the test process (conftest.py), so on a CUDA host too torch's CUDA scaler
    # disables itself here, as it does wherever CUDA is missing
    assert not torch.cuda.is_available()
    with pytest.raises(TinyLLMError, match="gradient scaler"):
        make_scaler(CUDA, "float16")


def test_the_cpu_capability_probe_asks_functions_this_torch_has():
    # machine() asks torch's private probes; were they renamed, it would quietly say
    # "no bfloat16" and never measure. This fails instead.
    for name in (device_module.AVX512_BF16_PROBE, device_module.AMX_PROBE):
        assert isinstance(getattr(torch.cpu, name)(), bool), name


@pytest.mark.parametrize("avx512_bf16, amx, dtype", [
    (True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")])
def test_mocked_cpu_capabilities_decide_what_auto_starts_from(fake_machine, capsys, avx512_bf16, amx, dtype):
    fake_machine(cuda=False, mps=False, avx512_bf16=avx512_bf16, amx=amx)
    assert choose_device("auto") == CPU and default_preset("cpu") == "tiny"
    assert resolve_dtype("auto", CPU) == dtype  # bfloat16 only where the CPU computes it natively
    assert resolve_dtype("bfloat16", CPU) == "bfloat16"  # allowed on CPU: CPU autocast supports it
    assert ("emulated" in capsys.readouterr().err) == (dtype == "float32")  # said when it will be slow
    assert make_scaler(CPU, "float16").is_enabled()


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA L4", "bfloat16", 121), ("NVIDIA L40S", "bfloat16", 362), ("NVIDIA L40", "bfloat16", 181),
    ("NVIDIA A100-SXM4-80GB", "float32", 156), ("Tesla T4", "float16", 65), ("Tesla T4", "float32", 8.1),
])
def test_mocked_gpu_mfu_peaks_by_exact_name_and_dtype(fake_gpu, name, dtype, tflops):
    fake_gpu(name, (8, 0))
    assert peak_flops(CUDA, dtype) == pytest.approx(tflops * 1e12)
    assert device_module.mfu_note(CUDA, dtype) is None  # a known peak: MFU on every progress line, no note


@pytest.mark.parametrize("name, dtype", [("NVIDIA RTX A1000", "bfloat16"), ("Tesla T4", "bfloat16")])
def test_mocked_unknown_gpu_or_dtype_has_no_mfu_and_says_so_in_a_start_up_line(fake_gpu, capsys, name, dtype):
    fake_gpu(name, (8, 6))
    assert peak_flops(CUDA, dtype) is None and capsys.readouterr().out == ""  # asked at every progress line: silent
    note = device_module.mfu_note(CUDA, dtype)
    assert "MFU is not shown" in note and name in note and dtype in note
    assert device_module.mfu_note(CPU, dtype) is None  # no peak on a CPU, and nothing to say


def test_a_resume_on_fewer_gpus_restores_those_it_has_and_says_so():
    state = {"cuda": [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)], "mps": None}  # 2 GPUs
    gpus, mps, note = device_module.device_states(state, SimpleNamespace(gpus=1, mps=False))
    assert len(gpus) == 1 and torch.equal(gpus[0], state["cuda"][0]) and mps is None
    assert "2 GPU(s), this machine has 1" in note
    gpus, _, note = device_module.device_states(state, SimpleNamespace(gpus=2, mps=False))
    assert len(gpus) == 2 and note is None


TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}


def test_under_torchrun_each_gpu_rank_takes_its_own_gpu_with_nccl_and_a_cpu_rank_gloo():
    assert ddp.processes_plan(CUDA, TORCHRUN, gpus=2) == (1, 2, torch.device("cuda:1"), "nccl")
    assert ddp.processes_plan(CPU, TORCHRUN, gpus=2) == (1, 2, CPU, "gloo")
    assert ddp.processes_plan(CUDA, {}, gpus=2) == (0, 1, CUDA, None)  # no torchrun: one process


@pytest.mark.parametrize("device, env, words", [
    (torch.device("mps"), TORCHRUN, "--device cpu"),                              # Gloo takes no MPS tensors
    (CUDA, {**TORCHRUN, "LOCAL_WORLD_SIZE": "2"}, "--nproc_per_node=1"),          # two processes, one GPU
])
def test_torchrun_that_cannot_work_here_is_refused_before_joining(device, env, words):
    with pytest.raises(TinyLLMError, match=words):
        ddp.processes_plan(device, env, gpus=1)


def test_gpu_float32_matmuls_use_tf32_and_a_cpu_never_does(matmul_precision):
    device_module.configure_matmul(CPU)
    assert torch.get_float32_matmul_precision() == "highest"
    device_module.configure_matmul(CUDA)  # a setting of torch's: it needs no GPU to be made
    assert torch.get_float32_matmul_precision() == "high"


# ----------------------------------------------------------------------------- float16's loss scaling

def test_float16s_scaler_skips_a_step_whose_gradient_overflowed():
    # train_step unscales before clipping and steps through the scaler, which skips an inf step
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    model.lm_head.weight.register_hook(lambda g: torch.full_like(g, math.inf))  # every backward: an inf gradient
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    before = copy.deepcopy(model.state_dict())
    batch = fixed_batch()
    train.train_step(model, optimizer, lambda: batch, 1e-3, 1, 1.0, autocast(CPU, "float16"),
                     torch.amp.GradScaler("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped, not half taken


def test_a_float16_run_checkpoints_its_loss_scale_and_resumes_it(shakespeare_head, tmp_path):
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=6, eval_interval=3, dtype="float16")
    train.train(tiny_model_config(), cfg)
    saved = load_checkpoint(str(tmp_path / "last.pt"))["scaler"]
    assert saved["scale"] > 0 and {"growth_factor", "backoff_factor", "_growth_tracker"} <= set(saved)
    saved["scale"] = 1234.0
    checkpoint = load_checkpoint(str(tmp_path / "last.pt"))
    checkpoint["scaler"] = saved
    save_checkpoint(str(tmp_path / "last.pt"), checkpoint)
    run = train.setup_run(tiny_model_config(), cfg, RunOptions(resume=True), "test", {})
    assert run.scaler.get_scale() == 1234.0


# ----------------------------------------------------------------------------- RoPE without complex numbers

def test_real_rope_rotates_the_same_pairs_as_the_complex_formulation():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(pos="rope", block_size=32))
    x = torch.randn(2, 32, 2, 4, 16)
    new = apply_rope(x, model.rope_cos[:, None, None], model.rope_sin[:, None, None])
    cos, sin = rope_angles(32, 16)  # from the formula, not from the model's tables
    assert torch.allclose(new, complex_rope(x, cos[:, None, None], sin[:, None, None]), atol=1e-6)


def test_a_rope_checkpoint_of_the_old_code_gives_the_same_logits_and_greedy_text(monkeypatch):
    import model as model_module
    torch.manual_seed(0)
    model = GPT(tiny_model_config(pos="rope", mlp="swiglu", block_size=16)).eval()
    idx = torch.randint(0, 65, (2, 16))
    logits = model(idx)[0]
    greedy = sampling.generate(model, idx[:1, :4], 40, GREEDY)

    monkeypatch.setattr(model_module, "apply_rope", complex_rope)  # the formulation RoPE had before
    assert torch.allclose(model(idx)[0], logits, atol=1e-5)
    assert torch.equal(sampling.generate(model, idx[:1, :4], 40, GREEDY), greedy)


class DtypeRecorder(TorchDispatchMode):
    """Every dtype that passes through an ATen op, forward and backward."""

    def __init__(self):
        super().__init__()
        self.dtypes, self.ops = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        self.ops.append(func)
        return out


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_forward_and_backward_use_no_complex_dtype(pos):
    model = GPT(tiny_model_config(pos=pos))
    idx = torch.randint(0, 65, (2, 16))
    with DtypeRecorder() as seen:
        _, loss = model(idx, idx)
        loss.backward()
    assert not {torch.complex64, torch.complex128, torch.complex32} & seen.dtypes


# ----------------------------------------------------------------------------- host syncs

class SyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), .tolist(), bool()): each one
    makes the CPU wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("accum", [1, 4])
def test_a_training_step_never_waits_for_the_device(accum):
    model = GPT(tiny_model_config())
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    batch = fixed_batch()
    with SyncCounter() as counter:
        for _ in range(3):
            train.train_step(model, optimizer, lambda: batch, 1e-3, accum, 1.0, contextlib.nullcontext())
    assert counter.syncs == 0


def test_the_loop_reads_the_device_only_at_progress_lines(shakespeare_head, tmp_path, monkeypatch):
    reads = []
    real = records.Meter.read
    monkeypatch.setattr(records.Meter, "read", lambda meter: reads.append(len(meter.pending)) or real(meter))
    cfg = tiny_train_config(shakespeare_head, tmp_path, max_steps=20, eval_interval=20, log_interval=10)
    train.train(tiny_model_config(), cfg)
    assert [n for n in reads if n] == [10, 10]  # one read for every ten steps


# ----------------------------------------------------------------------------- bfloat16 on a CPU, end to end

def test_a_bfloat16_cpu_run_trains_evaluates_and_generates_with_the_cache(shakespeare_head, tmp_path):
    cfg = tiny_train_config(shakespeare_head, tmp_path, dtype="bfloat16", max_steps=30, eval_interval=15, lr=1e-2)
    result = train.train(tiny_model_config(pos="rope", block_size=8), cfg)
    evals = [h for h in result["history"] if h["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    model = result["model"].eval()
    prompt = torch.randint(0, 50, (2, 3))
    with autocast(CPU, "bfloat16"):
        cached = sampling.generate(model, prompt, 30, GREEDY, use_cache=True)
        full = sampling.generate(model, prompt, 30, GREEDY, use_cache=False)
    assert torch.equal(cached, full)


def test_a_bfloat16_runs_closing_sample_is_decoded_in_float32_as_generate_py_does(shakespeare_head, tmp_path,
                                                                                   capsys, monkeypatch):
    seen, real = [], sampling.sample_next
    monkeypatch.setattr(sampling, "sample_next",
                        lambda logits, *a, **k: seen.append((logits.dtype, torch.is_autocast_enabled("cpu")))
                        or real(logits, *a, **k))
    cfg = tiny_train_config(shakespeare_head, tmp_path, dtype="bfloat16", max_steps=10, sample_tokens=40)
    result = train.train(tiny_model_config(), cfg)
    assert seen == [(torch.float32, False)] * 40  # every step of the closing sample, outside autocast
    printed = capsys.readouterr().out.split("sample:\n", 1)[1].rstrip("\n")
    model, tokenizer = result["model"].eval(), load_model(str(tmp_path / "last.pt"))[1]
    out = sampling.generate(model, torch.tensor([start_ids(tokenizer)]), 40, Sampler(temperature=0.8),
                            generator=torch.Generator().manual_seed(cfg.seed))  # as generate.py decodes
    assert printed == tokenizer.decode(out[0].tolist())


def test_train_never_sets_tf32_precision_on_cpu(shakespeare_head, tmp_path, matmul_precision):
    train.train(tiny_model_config(), tiny_train_config(shakespeare_head, tmp_path, max_steps=2))
    import bench
    bench.main(["train", "--device", "cpu", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
                "--batch_size", "4", "--steps", "1", "--untimed", "0", "--out", str(tmp_path / "b.json")])
    assert torch.get_float32_matmul_precision() == "highest"


def test_generate_loads_on_the_cpu_and_moves_only_the_model(trained, monkeypatch, capsys):
    import generate
    from conftest import cli
    seen = {}
    real_load_model = generate.load_model

    def recording_load_model(path, device):
        seen["checkpoint"] = real_load_model(path)[2]
        return real_load_model(path, device)

    def fake_sample(model, tokenizer, prompt_ids, cfg, sampler, device, stream=False, **options):
        seen["model_device"] = next(model.parameters()).device
        return [("text", 4, False)]

    monkeypatch.setattr(generate, "load_model", recording_load_model)
    monkeypatch.setattr(generate, "choose_device", lambda name: torch.device("meta"))  # a stand-in for a GPU
    monkeypatch.setattr(generate, "sample", fake_sample)
    code, out, err = cli(capsys, generate.main, str(trained[0] / "last.pt"))
    assert code == 0, err
    assert seen["model_device"].type == "meta"  # (a GPU-saved checkpoint loading on the CPU: tests/test_gpu.py)
    assert "optimizer" not in seen["checkpoint"]  # the optimizer state never travels to the device

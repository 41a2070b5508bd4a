"""CUDA graphs for decoding: a small model's one-token step is a few hundred short kernels that cost more
to launch from Python than to run, so a graph replays them in one launch. That needs the same shapes, memory
and control flow every step: sampling.decode reads its position from a tensor, writes the cache in place."""

import contextlib
import sys

import torch


def recorder(device):
    """The function that records a step on device, or None where none does (a CPU, a Mac)."""
    return record_cuda if device.type == "cuda" else None


def replayable(step, token, keep):
    """step(token) -> logits replayed from a recording where the device records one (CUDA), else step. keep:
    the tensors step changes in place other than by position (the cache's position), put back after trials."""
    record = recorder(token.device)
    return Replayed(step, record, keep) if record else step


def record_cuda(step, static, keep):
    """replay() -> step(static)'s output, from a CUDA graph recorded on static's GPU (recording runs nothing)."""
    device, saved = static.device, [t.clone() for t in keep]
    with torch.cuda.device(device):  # (streams, recording and replay on the tensors' own GPU)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # steps on this stream first: cuBLAS and the allocator set up outside the recording
                step(static)
                for t, s in zip(keep, saved):
                    t.copy_(s)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with without_autocast_cache(), torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                out = step(static)
            finally:
                graph.capture_end()  # (also after a failure: the stream and the allocator back as they were)
        torch.cuda.current_stream(device).wait_stream(stream)

    def replay():
        with torch.cuda.device(device):
            graph.replay()
        return out
    return replay


def without_autocast_cache():
    """Autocast keeps the low-precision copies of the weights it made in a cache that it empties
    on leaving, which would free memory a recording reads: record with that cache off."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class Replayed:
    """step recorded, each call replayed on its token. The first call also runs step from the same state to
    compare; a failure or a disagreement warns once, and every later call runs step as it is."""

    def __init__(self, step, record, keep):
        self.step, self.record, self.keep = step, record, keep
        self.static, self.replay, self.eager = None, None, False

    def __call__(self, token):
        if self.eager:
            return self.step(token)
        if self.replay is None:
            return self.first(token)
        self.static.copy_(token)
        return self.replay().clone()  # a copy: the next replay overwrites the recording's output

    def first(self, token):
        saved = [t.clone() for t in self.keep]
        self.static = token.clone()
        try:
            self.replay = self.record(self.step, self.static, self.keep)
            self.put_back(saved)
            replayed = self.replay().clone()
        except Exception as e:  # a kernel or an allocation that cannot be recorded: decode as before
            self.give_up(f"recording the decoding step failed ({type(e).__name__}: {str(e)[:200]})")
            self.put_back(saved)
            return self.step(token)
        moved = [t.clone() for t in self.keep]
        self.put_back(saved)
        logits = self.step(token)  # the step as it is, from the same state: the reference
        worst = (replayed.float() - logits.float()).abs().max().item()
        if not all(torch.equal(a, b) for a, b in zip(moved, self.keep)):
            self.give_up("the recorded decoding step does not move the cache as the step itself does")
        elif not worst <= 1e-2 * logits.float().abs().max().item() + 1e-4:
            self.give_up(f"the recorded decoding step disagrees with the step itself (by {worst:.3g})")
        return logits

    def put_back(self, saved):
        for t, s in zip(self.keep, saved):
            t.copy_(s)

    def give_up(self, why):
        print(f"warning: {why}; decoding without a CUDA graph", file=sys.stderr, flush=True)
        self.eager = True

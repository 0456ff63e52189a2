"""resolve_device: names to torch.device, with clear errors (both CUDA branches via monkeypatch)."""

import pytest
import torch

from pyrovae.devices import resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_by_any_spelling(name):
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["auto", None])
def test_auto_picks_cpu_without_cuda(no_cuda, name):
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["auto", None])
def test_auto_picks_cuda_when_available(one_gpu, name):
    assert resolve_device(name).type == "cuda"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_cuda_when_available(one_gpu, name):
    assert resolve_device(name) == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_says_so(no_cuda, name):
    with pytest.raises(ValueError, match="CUDA is not available") as error:
        resolve_device(name)
    assert "cpu" in str(error.value)  # names the way out


def test_missing_gpu_index_names_the_count(one_gpu):
    with pytest.raises(ValueError, match=r"has 1 CUDA device.*cuda:0\.\.cuda:0"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "cuda:", "mps:0", ""])
def test_unknown_names(no_cuda, name):
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device(name)


@pytest.mark.parametrize("name", [0, 1.5, ["cpu"]])
def test_non_string_names(name):
    with pytest.raises(ValueError, match="device must be a string"):
        resolve_device(name)

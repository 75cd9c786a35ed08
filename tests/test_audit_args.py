"""eval.audit's arguments: a radius of 0, a --sweep radius the eps check refuses, the audited
weights as their own surrogate, a bare surrogate checkpoint without its arch and one of another
dataset are one-line errors naming the surrogate's own flags, before any attack."""
from __future__ import annotations

import pytest
import torch

import models
from eval import audit


@pytest.fixture()
def nets(tmp_path):
    torch.manual_seed(0)
    torch.save(models.build_model("wrn-16-1", 10, dataset="digits").state_dict(),
               tmp_path / "net.pt")
    torch.manual_seed(1)
    other = models.build_model("wrn-16-1", 10, dataset="digits").state_dict()
    torch.save(other, tmp_path / "other.pt")
    # Bare checkpoints of other datasets: CIFAR-100 (100 classes), and grayscale images (what
    # a model of one-channel images has in its first convolution).
    torch.save(models.build_model("wrn-16-1", 100, dataset="cifar100").state_dict(),
               tmp_path / "cifar100.pt")
    torch.save({**other, "conv1.weight": other["conv1.weight"][:, :1].clone()},
               tmp_path / "gray.pt")
    return tmp_path


@pytest.mark.parametrize("extra, needles", [
    (["--eps", "0"], ["--eps 0: an audit needs a radius > 0"]),
    (["--sweep", "0,8/255,8"], ["--sweep=8 must be < 1 under linf", "did you mean 8/255?"]),
    (["--surrogate", "{dir}/net.pt", "--surrogate-arch", "wrn-16-1"],
     ["holds the audited weights themselves"]),
    (["--surrogate", "{dir}/other.pt"], ["give --surrogate-arch"]),
    (["--surrogate", "{dir}/other.pt", "--surrogate-weights", "last"], ["give --surrogate-arch"]),
    # A bare surrogate is taken to be of the model's dataset: one of another is named as such.
    (["--surrogate", "{dir}/cifar100.pt", "--surrogate-arch", "wrn-16-1"],
     ["--surrogate {dir}/cifar100.pt has 100 outputs", "audited model (wrn-16-1, digits) 10"]),
    (["--surrogate", "{dir}/gray.pt", "--surrogate-arch", "wrn-16-1"],
     ["--surrogate {dir}/gray.pt has 1 input channels", "audited model (wrn-16-1, digits) 3"]),
])
def test_bad_audit_arguments_are_one_line_errors(nets, capsys, extra, needles):
    args = [str(nets / "net.pt"), "--arch", "wrn-16-1", "--dataset", "digits", "--device",
            "cpu", "--n-ex", "4", "--quick", *(a.format(dir=nets) for a in extra)]
    code = audit.main(args)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle.format(dir=nets) in err, err
    assert not list(nets.glob("eval/audit*.json"))


def test_another_network_is_a_valid_surrogate(nets, capsys):
    assert audit.main([str(nets / "net.pt"), "--arch", "wrn-16-1", "--dataset", "digits",
                       "--device", "cpu", "--n-ex", "4", "--quick", "--surrogate",
                       str(nets / "other.pt"), "--surrogate-arch", "wrn-16-1"]) == 0
    assert "transfer" in capsys.readouterr().out

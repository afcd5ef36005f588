"""What many test files share: random weights, and the `slow` marker (`make test-fast` skips it)."""

import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real DeepSpeed ranks in subprocesses (minutes); "
                                       "`make test-fast` leaves these out, `make test` runs them")


def randomize(module: torch.nn.Module, std: float, seed: int | None = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, std²) (seeded unless seed is None): zero-initialised tensors (nanochat's output
    projections, SAM's rel-pos and pos tables) would hide a wrong key mapping and give no gradient at step 0."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module

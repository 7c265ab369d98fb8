"""Argument checks shared by the op files (private: not an op module)."""
import torch


def check_pos(pos: torch.Tensor, what: str) -> None:
    """``pos`` must be a 0-d int64 tensor (the position of the first new token)."""
    if pos.dim() != 0 or pos.dtype != torch.int64:
        raise ValueError(f"{what}: pos must be a 0-d int64 tensor, got shape {tuple(pos.shape)} "
                         f"dtype {pos.dtype}")

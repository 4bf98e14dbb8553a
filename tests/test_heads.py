import pytest
import torch

from peftlab.heads import Classifier, pool
from peftlab.models import load_backbone
from tests.conftest import assert_rows_pool_as_alone


def test_pool_picks_the_right_positions():
    h = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)  # value = flat position
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool(h, left, "last").view(-1).tolist() == [3, 7]
    assert pool(h, right, "last").view(-1).tolist() == [1, 7]
    assert pool(h, left, "first").view(-1).tolist() == [2, 4]
    assert pool(h, right, "first").view(-1).tolist() == [0, 4]
    assert pool(h, left, "mean").view(-1).tolist() == [2.5, 5.5]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("pooling", ["auto", "mean"])
def test_padded_rows_pool_the_same_as_alone(name, pooling):
    b = load_backbone(name)
    torch.manual_seed(0)
    assert_rows_pool_as_alone(b.tokenizer, Classifier(b.arch, 3, pooling).eval())

import hashlib

import torch

from alignment.seeding import stream_generator, stream_seed


def test_stream_seed_is_blake2b_of_the_keys_truncated_to_63_bits():
    digest = hashlib.blake2b(repr((7, "noise", 3, 12)).encode(), digest_size=8).digest()
    assert stream_seed(7, "noise", 3, 12) == int.from_bytes(digest, "little") & (2**63 - 1)
    assert stream_seed(7, "noise", 3, 12) != stream_seed(7, "noise", 3, 13)
    assert stream_seed(7, "noise", 3, 12) != stream_seed(8, "noise", 3, 12)


def test_stream_generator_draws_the_same_numbers_for_the_same_keys():
    a = torch.randn(5, generator=stream_generator(0, "noise", 1, 2))
    b = torch.randn(5, generator=stream_generator(0, "noise", 1, 2))
    c = torch.randn(5, generator=stream_generator(0, "noise", 2, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

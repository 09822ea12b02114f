import torch

from ditkit.metrics.memory import peak_memory, retained_memory


def test_peak_counts_live_tensors_only():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB live
        del a
        c = b + 1  # still 8 MB live: a was freed
        return c.sum()

    assert peak_memory(work) == 8_000_000 + 4  # plus the 4-byte sum


def test_existing_inputs_are_not_counted():
    x = torch.ones(1000, 1000)
    assert peak_memory(lambda: x.view(-1)) == 0


def test_retained_counts_what_the_result_keeps_alive():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB, freed before returning
        b = a * 2  # kept: returned
        del a
        return b

    assert retained_memory(work) == 4_000_000


def test_meta_tensors_count_their_would_be_bytes():
    def work():
        a = torch.ones(1000, 1000, device="meta")
        b = a * 2
        del a
        return (b + 1).sum()

    assert peak_memory(work, "meta") == 8_000_000 + 4
    assert peak_memory(work) == 0  # real-device tracking ignores meta tensors

"""rng: Philox4x32-10 against Random123's known answers, the NV generator against CUDA numbers published by others
(and against the GPU itself where there is one), ImageRNG's draw order against hand-derived expectations."""

import math
import random

import pytest
import torch

from stablediff.rng import (ImageRNG, PhiloxGenerator, batch_seeds, create_generator, cuda_max_threads, mulhilo32,
                            paste_centered, philox4x32, philox_normal, slerp)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def words(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


# Random123's kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
@pytest.mark.parametrize("ctr, key, out", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, out):
    assert [int(w) for w in philox4x32(words(*ctr), words(*key))] == list(out)


def test_mulhilo32_is_the_exact_64_bit_product():
    rnd = random.Random(0)
    a = [0, 1, 0xFFFFFFFF, 0x80000000] + [rnd.getrandbits(32) for _ in range(200)]
    for m in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 1):
        hi, lo = mulhilo32(torch.tensor(a), m)
        assert [(h << 32) | low for h, low in zip(hi.tolist(), lo.tolist())] == [x * m for x in a]


# torch.manual_seed(0); torch.randn(3, 4, device="cuda"): A1111's modules/rng_philox.py docstring (8 digits), and
# the same first 12 values in the 8x8 tensor of a torch.compile tutorial blog (found twice in the code corpus).
SEED0_CUDA = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
              [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
              [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
# That blog: x = randn(8, 8), y = randn(8, 8), b = randn(8) on CUDA after manual_seed(0); it prints x and
# relu(x + 0.5 * y + b) to 4 digits (rows 0, 3 and 7 of each here).
BLOG_X = {0: [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284],
          3: [0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373, 1.3506, -0.2879],
          7: [-0.5499, -0.3231, -0.5469, 0.9049, 0.2837, 0.1210, 0.4730, -1.0823]}
BLOG_OUT = {0: [1.7098, 0, 0, 0, 0.67049, 0, 0.34424, 0.011223],
            3: [2.4750, 0, 1.9079, 0.54869, 0.37923, 0, 3.1791, 0.66843],
            7: [1.5554, 0, 0, 0.94380, 0.0029795, 0.074125, 1.6286, 0]}


def test_seed_0_matches_published_cuda_values():
    torch.testing.assert_close(PhiloxGenerator(0).randn((3, 4)), torch.tensor(SEED0_CUDA), atol=1e-6, rtol=0)


def test_successive_draws_continue_as_cuda_does():
    g = PhiloxGenerator(0)
    x, y, b = g.randn((8, 8)), g.randn((8, 8)), g.randn((8,))
    out = torch.relu(x + 0.5 * y + b)
    for row in BLOG_X:
        torch.testing.assert_close(x[row], torch.tensor(BLOG_X[row]), atol=6e-5, rtol=0)
        torch.testing.assert_close(out[row], torch.tensor(BLOG_OUT[row]), atol=6e-5, rtol=1e-4)
    assert g.offset == 12  # three calls of one curand4 per thread


# Large draws, where torch's grid is capped by the card (pytorch issues): one thread serves several elements, taking
# all four normals of each curand4 call in turn, so the tail of the tensor differs from card to card.
def test_capped_grid_matches_a100_and_h100():
    # pytorch/pytorch#143086: Generator("cuda").manual_seed(1); randn(1, 49*12*112*144): first and last 3 values.
    n = 49 * 12 * 112 * 144
    index = torch.tensor([0, 1, 2, n - 3, n - 2, n - 1])
    head = [-0.2963, 2.6764, -0.1408]
    for sms, tail in ((108, [0.1549, -0.6797, -0.1656]),  # A100: 108 SMs x 2048 threads
                      (132, [-0.6970, -0.7780, 0.3267])):  # H100 SXM: 132 SMs x 2048 threads
        got = philox_normal(1, 0, index, n, cuda_max_threads(sms, 2048))
        torch.testing.assert_close(got, torch.tensor(head + tail), atol=6e-5, rtol=0)


def test_capped_grid_matches_normal_on_rtx_a4000():
    # pytorch/pytorch#97097: manual_seed(14); cuda.FloatTensor(1000, 100).normal_(5, 5 ** .5) on an RTX A4000
    # (48 SMs x 1536 threads, below 100000 elements): first row's and last row's first and last three values.
    n = 100_000
    got = philox_normal(14, 0, torch.tensor([0, 1, 2, n - 3, n - 2, n - 1]), n, cuda_max_threads(48, 1536))
    want = torch.tensor([2.8731, 5.2727, 2.9889, 8.2207, 6.5395, 4.2604])
    torch.testing.assert_close(got * math.sqrt(5) + 5, want, atol=1e-4, rtol=0)


def test_uncapped_draw_matches_rtx_a6000():
    # pytorch/pytorch#62467: Generator("cuda").manual_seed(43); normal_ of (1, 3, 128, 128) on an RTX A6000 (whose
    # grid covers all 49152 elements), noise[..., 0, 0].
    got = PhiloxGenerator(43).randn((1, 3, 128, 128))[..., 0, 0]
    torch.testing.assert_close(got, torch.tensor([[1.9983, 0.8704, 2.1127]]), atol=6e-5, rtol=0)


def test_offset_advances_by_calls_per_thread():
    g = PhiloxGenerator(5, max_threads=256)
    g.randn((1024,))  # 256 threads x 4 normals = one call each
    assert g.offset == 4
    g.randn((1025,))  # one element more needs a second call
    assert g.offset == 12
    first, second = PhiloxGenerator(5).randn((7,)), PhiloxGenerator(5, offset=4).randn((7,))
    g = PhiloxGenerator(5)
    assert torch.equal(g.randn((7,)), first) and torch.equal(g.randn((7,)), second)
    assert not torch.equal(first, second)


def test_large_seeds_use_both_key_words():
    a, b = PhiloxGenerator(7).randn((16,)), PhiloxGenerator(7 + 2 ** 32).randn((16,))
    assert not torch.equal(a, b)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="-1"):
        PhiloxGenerator(-1)
    with pytest.raises(ValueError, match="offset 6"):
        PhiloxGenerator(0, offset=6)
    with pytest.raises(ValueError, match="'tpu'"):
        create_generator("tpu", 0)
    with pytest.raises(ValueError, match="1.5"):
        ImageRNG((4, 8, 8), [1], subseed_strength=1.5)
    with pytest.raises(ValueError, match="seed_resize_from"):
        ImageRNG((4, 8, 8), [1], seed_resize_from=(0, 64))


# ImageRNG: A1111's draw order (modules/rng.py ImageRNG, processing.py).
SHAPE = (4, 6, 5)


def cpu_draws(seed, n, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_cpu_source_draws_per_image_generators_in_turn():
    rng = ImageRNG(SHAPE, [10, 11], source="cpu")
    draws = [rng.next() for _ in range(3)]
    for k, seed in enumerate((10, 11)):
        for i, want in enumerate(cpu_draws(seed, 3)):
            assert torch.equal(draws[i][k], want)


def test_ensd_reseeds_every_image_after_the_starting_noise():
    rng = ImageRNG(SHAPE, [10, 11], source="cpu", ensd=31337)
    start, second, third = rng.next(), rng.next(), rng.next()
    for k, seed in enumerate((10, 11)):
        assert torch.equal(start[k], cpu_draws(seed, 1)[0])
        after = cpu_draws(seed + 31337, 2)
        assert torch.equal(second[k], after[0]) and torch.equal(third[k], after[1])


def test_nv_source_and_gpu_without_cuda_draw_the_philox_numbers():
    nv = ImageRNG(SHAPE, [3], source="nv", ensd=5)
    start, later = nv.next(), nv.next()
    assert torch.equal(start[0], PhiloxGenerator(3).randn(SHAPE))
    assert torch.equal(later[0], PhiloxGenerator(8).randn(SHAPE))
    gpu = ImageRNG(SHAPE, [3], source="gpu", device="cpu", ensd=5)
    assert torch.equal(gpu.next(), start) and torch.equal(gpu.next(), later)


def test_slerp_turns_between_orthogonal_columns():
    low, high = torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.0], [2.0]]])  # (C=1, H=2, W=1)
    got = slerp(1 / 3, low, high)  # angle 90 degrees: weights sin(60)/1 and sin(30)/1
    torch.testing.assert_close(got, torch.tensor([[[math.sin(math.pi / 3)], [2 * math.sin(math.pi / 6)]]]))


def test_variation_seed_slerps_towards_the_subseed_noise():
    seeds, subseeds = batch_seeds(10, 2, subseed=20, subseed_strength=0.3)
    assert seeds == [10, 10] and subseeds == [20, 21]
    rng = ImageRNG(SHAPE, seeds, source="cpu", subseeds=subseeds, subseed_strength=0.3)
    start, later = rng.next(), rng.next()
    for k in range(2):
        want = slerp(0.3, cpu_draws(10, 1)[0], cpu_draws(20 + k, 1)[0])
        assert torch.equal(start[k], want)
        assert torch.equal(later[k], cpu_draws(10, 2)[1])  # the subseed's draw leaves the image's generator alone
    full = ImageRNG(SHAPE, [10], source="cpu", subseeds=[20], subseed_strength=1.0).next()
    torch.testing.assert_close(full[0], cpu_draws(20, 1)[0])
    missing = ImageRNG(SHAPE, [10, 10], source="cpu", subseeds=[20], subseed_strength=0.5).next()
    assert torch.equal(missing[1], slerp(0.5, cpu_draws(10, 1)[0], cpu_draws(0, 1)[0]))  # past the list: subseed 0


def test_batch_seeds_count_up_without_variation():
    assert batch_seeds(7, 3, subseed=1) == ([7, 8, 9], [1, 2, 3])


def test_seed_resize_pastes_the_smaller_noise_in_the_middle():
    # latent 6x5 (H x W); seed noise from 32x16 pixels = 2 rows x 4 columns: margins (6-2)//2 = 2, (5-4)//2 = 0.
    rng = ImageRNG(SHAPE, [10], source="cpu", seed_resize_from=(32, 16))
    start, later = rng.next(), rng.next()
    seed_noise = cpu_draws(10, 1, (4, 2, 4))[0]
    own = cpu_draws(10, 2)
    want = own[0].clone()
    want[:, 2:4, 0:4] = seed_noise
    assert torch.equal(start[0], want)
    assert torch.equal(later[0], own[1])


def test_paste_centered_crops_a_larger_noise_with_a1111s_rounding():
    dst, src = torch.zeros(1, 6, 5), torch.arange(8 * 8.0).reshape(1, 8, 8)
    got = paste_centered(dst, src)
    # rows: margin (6-8)//2 = -1, 8-2 = 6 rows from row 1; columns: (5-8)//2 = -2, 8-4 = 4 columns from column 2,
    # so the odd difference leaves dst's last column.
    assert torch.equal(got[:, :, 0:4], src[:, 1:7, 2:6])
    assert torch.equal(got[:, :, 4], torch.zeros(1, 6))


@cuda
@pytest.mark.parametrize("seed", [0, 1, 1055747, 2 ** 32 + 17])
def test_matches_torch_randn_on_cuda(seed):
    props = torch.cuda.get_device_properties(0)
    cap = cuda_max_threads(props.multi_processor_count, props.max_threads_per_multi_processor)
    g = torch.Generator("cuda").manual_seed(seed)
    ours = PhiloxGenerator(seed, max_threads=cap)
    for shape in [(3, 4), (4, 64, 64), (1, 4, 97, 131), (5,), (4 * cap + 7,), (4, 128, 128)]:
        want = torch.randn(shape, device="cuda", generator=g).cpu()
        torch.testing.assert_close(ours.randn(shape), want, atol=2e-4, rtol=0)
        assert ours.offset == g.get_offset()


@cuda
def test_gpu_source_on_cuda_equals_nv():
    gpu = ImageRNG((4, 64, 64), [1055747, 1055748], source="gpu", device="cuda", ensd=31337)
    nv = ImageRNG((4, 64, 64), [1055747, 1055748], source="nv", ensd=31337)
    for _ in range(3):
        torch.testing.assert_close(gpu.next().cpu(), nv.next(), atol=2e-4, rtol=0)

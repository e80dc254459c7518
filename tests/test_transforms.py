"""jit, grad, vmap, pmap, shard_map and batch-sharded jit all give the eager values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jax_transducer as jt
from util import make_batch

BATCH = make_batch(50, B=8, T=7, U=4, V=9, blank=2, pad=0.0)
BLANK = 2


def loss(e, p, l, i, j):
    return jt.transducer_loss(e, p, l, i, j, blank=BLANK)


def total(e, p, l, i, j):
    return loss(e, p, l, i, j).sum()


def vit(e, p, i, j):
    return jt.viterbi(e, p, i, j, blank=BLANK)


GRAD = jax.grad(total, argnums=(0, 1))
COSTS, GRADS = loss(*BATCH), GRAD(*BATCH)
PATHS = vit(*BATCH[:2], *BATCH[3:])


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


def stacked(n=3):
    """n copies of the batch along a new leading axis, each perturbed differently."""
    E, P, L, I, J = BATCH
    return (np.stack([E + k for k in range(n)]), np.stack([P * (1 + k) for k in range(n)]),
            np.stack([L] * n), np.stack([I] * n), np.stack([J] * n))


def test_jit_grad_value_and_grad():
    close(jax.jit(loss)(*BATCH), COSTS)
    close(jax.jit(GRAD)(*BATCH), GRADS)
    value, grads = jax.value_and_grad(total, argnums=(0, 1))(*BATCH)
    close(value, COSTS.sum())
    close(grads, GRADS)
    close(jax.jit(vit)(*BATCH[:2], *BATCH[3:]), PATHS)


def test_vmap_matches_a_loop():
    S = stacked()
    want = np.stack([loss(*(a[k] for a in S)) for k in range(3)])
    close(jax.vmap(loss)(*S), want)
    close(jax.vmap(GRAD)(*S), [jnp.stack(x) for x in zip(*[GRAD(*(a[k] for a in S))
                                                           for k in range(3)])])
    close(jax.vmap(vit)(S[0], S[1], S[3], S[4]),
          np.stack([vit(S[0][k], S[1][k], S[3][k], S[4][k]) for k in range(3)]))


def test_nested_vmap_and_unmapped_arguments():
    S = stacked()
    nested = jax.vmap(jax.vmap(loss, in_axes=(0, 0, 0, 0, 0)), in_axes=(0, None, None, None, None))
    E2 = np.stack([S[0], S[0] * 0.5])
    got = nested(E2, *S[1:])
    for i in range(2):
        for k in range(3):
            close(got[i, k], loss(E2[i, k], *(a[k] for a in S[1:])))
    # in_axes=None mixes: only the emissions are mapped.
    close(jax.vmap(loss, in_axes=(0, None, None, None, None))(S[0], *BATCH[1:]),
          np.stack([loss(S[0][k], *BATCH[1:]) for k in range(3)]))


def test_jit_vmap_grad():
    S = stacked()
    got = jax.jit(jax.vmap(GRAD))(*S)
    close(got, [jnp.stack(x) for x in zip(*[GRAD(*(a[k] for a in S)) for k in range(3)])])


def test_vmap_runs_the_kernel_once():
    S = stacked()
    text = jax.jit(jax.vmap(GRAD)).lower(*S).as_text()
    assert text.count("jax_transducer_forward") == 1 and text.count("jax_transducer_backward") == 1
    # One call over the folded batch: 3 mapped copies x 8 examples.
    calls = [line for line in text.splitlines() if "@jax_transducer_" in line]
    assert calls and all("tensor<24x" in line for line in calls)


def shards(n=4):
    return [x.reshape((n, -1) + x.shape[1:]) for x in BATCH]


def test_pmap():
    close(jax.pmap(loss)(*shards()).reshape(-1), COSTS)
    gE, gP = jax.pmap(GRAD)(*shards())
    close((gE.reshape(GRADS[0].shape), gP.reshape(GRADS[1].shape)), GRADS)
    close(jax.pmap(vit)(*(shards()[i] for i in (0, 1, 3, 4))).reshape(PATHS.shape), PATHS)


@pytest.fixture
def mesh():
    return jax.make_mesh((4,), ("batch",))


def sharded(mesh):
    spec = NamedSharding(mesh, PartitionSpec("batch"))
    return [jax.device_put(x, spec) for x in BATCH], spec


def test_shard_map_with_default_checks(mesh):
    args, _ = sharded(mesh)
    spec = PartitionSpec("batch")
    smap = lambda f, n: jax.shard_map(f, mesh=mesh, in_specs=(spec,) * n, out_specs=spec)
    close(jax.jit(smap(loss, 5))(*args), COSTS)
    grad = jax.jit(jax.grad(lambda e, p: smap(loss, 5)(e, p, *args[2:]).sum(), argnums=(0, 1)))
    close(grad(*args[:2]), GRADS)
    # The loss summed inside: psum of the per-shard sums.
    summed = jax.shard_map(lambda *a: jax.lax.psum(total(*a), "batch"), mesh=mesh,
                           in_specs=(spec,) * 5, out_specs=PartitionSpec())
    close(jax.jit(summed)(*args), COSTS.sum())
    close(jax.jit(smap(vit, 4))(*(args[i] for i in (0, 1, 3, 4))), PATHS)


def test_sharded_jit_partitions_by_batch_without_gathering(mesh):
    args, spec = sharded(mesh)
    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)),
                   out_shardings=(NamedSharding(mesh, PartitionSpec()), (spec, spec)))
    value, grads = step(*args)
    close(value, COSTS.sum())
    close(grads, GRADS)
    assert grads[0].sharding.is_equivalent_to(spec, 3)
    for f, a in ((step, args), (jax.jit(vit, out_shardings=spec), [args[i] for i in (0, 1, 3, 4)])):
        hlo = f.lower(*a).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo
        calls = [line for line in hlo.splitlines() if "custom_call_target=\"jax_transducer" in line]
        assert calls and all("[2," in line for line in calls)  # 8 examples / 4 devices
    close(jax.jit(vit)(*(args[i] for i in (0, 1, 3, 4))), PATHS)

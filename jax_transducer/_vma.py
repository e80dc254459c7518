"""shard_map's varying-manual-axes types (vma): the helpers both implementations need so that
their results, and every scan carry, vary along the same mesh axes as their inputs."""

import jax


def varying_axes(*xs):
    """The shard_map axes along which any of xs varies (empty outside shard_map or with check_vma
    off)."""
    axes = frozenset()
    for x in xs:
        aval = jax.typeof(x)
        found = getattr(aval, "vma", None)  # the attribute's name differs across jax versions
        if found is None:
            found = getattr(getattr(aval, "mat", None), "varying", ())
        axes |= frozenset(found or ())
    return axes


def to_varying(x, axes):
    """x, typed as varying along `axes` too."""
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

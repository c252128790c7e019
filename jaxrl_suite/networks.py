"""Value/policy networks for deep RL in Flax NNX, with the bookkeeping neuron-level tools need.

Three kinds, one frozen :class:`NetworkConfig` (``kind``, ``depth``, ``width``, ``layer_norm``,
``activation``, ``kernel_init``) and one constructor :func:`make_network`:

``mlp``
    ``h_0 = x``, ``h_{l+1} = act(LN(W_l h_l + b_l))`` for ``l < depth``, ``y = W_out h_depth + b``.

``residual`` (BRO-style, Nauman et al. 2024)
    encoder ``e = act(LN(W_e x + b_e))``, stream ``z_0 = e``; block ``l``:
    ``u_l = z_l``, ``a_l = act(LN(W_in u_l + b_in))`` (the block's inner neurons),
    ``r_l = LN(W_out a_l + b_out)``, ``z_{l+1} = z_l + r_l``; ``y = W_head z_depth + b``.

``multiskip`` ("Stable Gradients for Stable Learning at Scale in Deep RL", Castanyer et al.
2025, arXiv 2506.15544)
    as ``residual``, but the encoder features are added to every later block's input:
    ``u_0 = z_0 = e`` and ``u_l = z_l + e`` for ``l >= 1`` (each block sees the encoder output
    through one addition, so the gradient reaches the encoder from every block directly).
    *Decision*: block 0 gets ``e`` once, not ``2 e``; the stream itself is the plain residual sum.

``multiskip_paper`` (the multi-skip residual MLP exactly as in Castanyer et al. 2025, Sec. 4 /
Fig. 3, and their code ``src/models/mlp.py`` ``MultiSkipResidualMLP``)
    ``h_0 = LN(W_in x + b_in)`` (no activation), global skip ``g = h_0``, stream ``z_0 = h_0``;
    block ``l``: ``a_l = act(LN(W_0 act(z_l) + b_0))`` (pre-activation, the block's inner
    neurons), ``F(z_l) = LN(W_1 a_l + b_1)``, ``z_{l+1} = z_l + F(z_l) + g``; linear head
    ``y = W_head z_depth + b``. Every block adds the encoder output to its *output*, so the
    gradient of the loss reaches ``W_in`` through ``depth + 1`` one-addition paths. Same module
    paths and :meth:`neuron_layers` as ``residual`` (``encoder``, ``blocks/<l>/inner``,
    ``blocks/<l>/out``); the ``encoder`` activations are ``h_0``.
    *Decision*: ``multiskip`` above stays as it was (an earlier variant that adds the encoder
    features to each later block's *input* and uses post-activation blocks); this kind is not
    in ``KINDS`` (whose members share one forward-equation oracle in the tests) but in
    ``ALL_KINDS``, the config's choices.

Conv encoder (``encoder="conv"``, any kind; issue 18 item 2)
    For image observations that the environment hands over flattened (MinAtar's ``[10, 10, C]``
    becomes a 400- to 1000-vector in :mod:`jaxrl_suite.envs.gymnax_backend`, row-major), the
    input is reshaped back to ``[H, W, C]`` (``image_hw``; ``C = in_dim / (H W)``) and passed
    through a small torso of ``len(conv_channels)`` convolutions, each
    ``c_{k+1} = act(LN(Conv_{3x3, stride 1, VALID}(c_k)))``; the last one is flattened and fed
    to the chosen MLP kind as its input ``x``. With the default ``conv_channels=(16,)`` this is
    the MinAtar network of Young & Tian (2019, "MinAtar", Sec. 4: one 3x3 conv with 16 channels,
    then a Dense layer) and the small Nature-style encoder the stable-gradients code puts
    before its MLP on pixels (``src/models/encoder.py`` ``AtariCNN``: conv, LayerNorm,
    activation per layer). *Decision*: ``LN`` normalises each position's channel vector
    (``nnx.LayerNorm`` on the last axis), so every channel owns one scale and bias entry as the
    neuron-level tools need; AtariCNN normalises over ``[C, H, W]`` jointly. Torso layers are
    neuron layers named ``torso/<k>`` (activations ``[batch, H', W', channels]``: health
    scores average over positions); a conv's outgoing weights are the next conv's kernel
    (axis ``-2`` is its input channel); the last conv's outputs are interleaved into the
    flattened vector, so that layer is not isolable (``outgoing=None``).

``LN`` is LayerNorm when ``layer_norm`` is set and the identity otherwise; ``depth`` counts
hidden layers for ``mlp`` and residual blocks for the other two. Parameters carry no logical-axis
metadata yet, so ``trainkit.sharding.param_shardings`` replicates them (fine at RL widths).

Addressing neurons
------------------
Every network answers :meth:`neuron_layers` with a tuple of :class:`NeuronLayer`: one entry per
group of neurons that health metrics score and resets may touch. Each names

* ``name``: the key of its activations in ``model(x, return_activations=True)[1]``; it is the
  module path joined with ``/`` (``"hidden/0"``, ``"blocks/1/inner"``), so it also says where the
  parameters live. The activations are the post-activation values (``h_l``, ``e``, ``a_l``), and
  for a block's output layer ``blocks/<l>/out`` the branch output ``r_l`` added to the stream; the
  dict also holds ``"features"``, the head's input;
* ``kernel``, ``bias``, ``norm_scale``, ``norm_bias``: leaf paths of the neurons' *incoming*
  parameters in the params pytree (``nnx.split(model, nnx.Param)[1]``, or its pure-dict form):
  neuron ``j`` owns kernel column ``[..., j]`` and entry ``j`` of the others;
* ``outgoing``: leaf paths of the kernels whose *rows* (axis ``-2``) read these neurons, or
  ``None`` when the neurons write into a residual stream that every later layer reads (encoder
  and block outputs): their outgoing weights cannot be isolated, so ReDo may not reset them.

The output head is never a neuron layer, so no reset can touch its columns.

Leaf paths are tuples of dict keys / sequence indices / attribute names as they appear in
``jax.tree_util.tree_flatten_with_path`` of the params tree, with the ``.value`` step of an
``nnx.Variable`` dropped: ``("hidden", 0, "dense", "kernel")``. :func:`tree_get` and
:func:`map_leaves_at` read and rewrite leaves by such paths in any pytree of that structure
(params, gradients, or the per-parameter moments inside an optax state).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from trainkit.config import Config, field

Path = tuple[Any, ...]
Initializer = Callable[..., jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
}

# Built once, so that equal configs give equal (and hashable) NeuronLayer descriptions.
KERNEL_INITS: dict[str, Initializer] = {
    "lecun_normal": nnx.initializers.lecun_normal(),
    "he_normal": nnx.initializers.he_normal(),
    "he_uniform": nnx.initializers.he_uniform(),
    "xavier_uniform": nnx.initializers.xavier_uniform(),
    "orthogonal": nnx.initializers.orthogonal(),
}

KINDS = ("mlp", "residual", "multiskip")
ALL_KINDS = KINDS + ("multiskip_paper",)
ENCODERS = ("none", "conv")

# Castanyer et al. (2025) network sizes: (width, residual blocks).
SG_SIZES = {"small": (512, 1), "medium": (1536, 3), "large": (2560, 5)}


@dataclasses.dataclass(frozen=True)
class NetworkConfig(Config):
    kind: str = field("mlp", choices=ALL_KINDS,
                      help="mlp | residual (BRO-style blocks) | multiskip (residual + encoder "
                           "features added to every block's input) | multiskip_paper "
                           "(Castanyer et al. 2025: pre-activation blocks, z <- z + F(z) + h0)")
    depth: int = field(2, ge=1, help="hidden layers (mlp) or residual blocks (residual, multiskip)")
    width: int = field(256, ge=1, help="hidden width (also the residual stream width)")
    layer_norm: bool = field(False, help="LayerNorm on every hidden Dense's outputs (before the "
                                         "activation, where there is one)")
    activation: str = field("relu", choices=tuple(ACTIVATIONS))
    kernel_init: str = field("lecun_normal", choices=tuple(KERNEL_INITS),
                             help="initializer of every Dense kernel (ReDo/ReGraMa re-use it)")
    encoder: str = field("none", choices=ENCODERS,
                         help="none | conv (3x3 conv torso on the observation reshaped to "
                              "image_hw x C, before the MLP; for MinAtar-style images)")
    image_hw: tuple[int, int] = field((10, 10), help="conv: observation height and width "
                                                     "(channels = observation size / (H W))")
    conv_channels: tuple[int, ...] = field((16,), help="conv: channels of each 3x3 stride-1 "
                                                       "VALID convolution")

    def validate(self) -> None:
        if self.encoder == "conv":
            h, w = self.image_hw
            if h < 1 or w < 1:
                raise self.invalid("image_hw", "height and width must be >= 1")
            if not self.conv_channels or min(self.conv_channels) < 1:
                raise self.invalid("conv_channels", "needs at least one entry, each >= 1")
            if min(h, w) - 2 * len(self.conv_channels) < 1:
                raise self.invalid("conv_channels", f"{len(self.conv_channels)} VALID 3x3 "
                                                    f"convolutions do not fit a {h} x {w} image")

    @classmethod
    def minatar_conv(cls, kind: str = "multiskip_paper", depth: int = 1, width: int = 256,
                     **kw) -> NetworkConfig:
        """A 16-channel 3x3 conv torso (Young & Tian 2019) before the given MLP kind."""
        return cls(kind=kind, depth=depth, width=width, encoder="conv",
                   **{"layer_norm": True, **kw})

    @classmethod
    def tiny(cls) -> "NetworkConfig":
        return cls(kind="mlp", depth=2, width=32)

    @classmethod
    def sac_mlp(cls) -> "NetworkConfig":
        """The usual 2 x 256 ReLU MLP of SAC/TD3 actors and critics on MuJoCo."""
        return cls(kind="mlp", depth=2, width=256, activation="relu")

    @classmethod
    def bro(cls) -> "NetworkConfig":
        """BroNet-like: residual blocks of width 512 with LayerNorm and ReLU (Nauman et al. 2024,
        "Bigger, Regularized, Optimistic")."""
        return cls(kind="residual", depth=2, width=512, layer_norm=True, activation="relu")

    @classmethod
    def multiskip_deep(cls) -> "NetworkConfig":
        """A deep multi-skip residual net of the kind scaled in Castanyer et al. (2025)."""
        return cls(kind="multiskip", depth=8, width=512, layer_norm=True, activation="relu")


    @classmethod
    def stable_gradients(cls, size: str = "small", kind: str = "multiskip_paper",
                         layer_norm: bool = True, activation: str = "relu",
                         kernel_init: str = "orthogonal") -> "NetworkConfig":
        """The paper's sizes (Castanyer et al. 2025): ``small`` 512 wide / 1 block, ``medium``
        1536 / 3, ``large`` 2560 / 5 (for ``kind="mlp"``: ``depth`` hidden layers)."""
        if size not in SG_SIZES:
            raise ValueError(f"size={size!r}: must be one of {', '.join(SG_SIZES)}")
        width, depth = SG_SIZES[size]
        return cls(kind=kind, depth=depth, width=width, layer_norm=layer_norm,
                   activation=activation, kernel_init=kernel_init)


@dataclasses.dataclass(frozen=True)
class NeuronLayer:
    """Where one group of neurons lives in the params pytree (see the module docstring)."""

    name: str
    width: int
    kernel: Path
    bias: Path | None
    norm_scale: Path | None
    norm_bias: Path | None
    outgoing: tuple[Path, ...] | None
    kernel_init: Initializer
    bias_init: Initializer = nnx.initializers.zeros_init()
    norm_scale_init: Initializer = nnx.initializers.ones_init()
    norm_bias_init: Initializer = nnx.initializers.zeros_init()

    @property
    def isolable(self) -> bool:
        """True when the outgoing weights are known (ReDo can silence the neurons)."""
        return self.outgoing is not None


# --- pytree paths ---------------------------------------------------------------------------


def _key_entry(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def normalize_path(keypath: Sequence[Any]) -> Path:
    """A ``jax.tree_util`` key path as a plain tuple, without the trailing ``.value`` of an
    ``nnx.Variable`` (so an ``nnx.State`` and its pure-dict form share paths)."""
    path = list(keypath)
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path.pop()
    return tuple(_key_entry(e) for e in path)


def path_name(path: Path) -> str:
    return "/".join(str(p) for p in path)


def leaf_paths(tree: Any) -> dict[Path, Any]:
    """``{path: leaf}`` for every leaf of ``tree``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {normalize_path(kp): leaf for kp, leaf in flat}


def _missing(path: Path, known: Sequence[Path]) -> KeyError:
    names = [path_name(p) for p in known]
    close = difflib.get_close_matches(path_name(path), names, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names)}"
    return KeyError(f"no leaf at path {path_name(path)!r} in this pytree; {hint}")


def tree_get(tree: Any, path: Path) -> Any:
    """The leaf of ``tree`` at ``path`` (KeyError naming close paths if there is none)."""
    leaves = leaf_paths(tree)
    if path not in leaves:
        raise _missing(path, list(leaves))
    return leaves[path]


def map_leaves_at(tree: Any, fns: Mapping[Path, Callable[[Any], Any]]) -> Any:
    """``tree`` with ``fns[path](leaf)`` at each listed path; every other leaf is returned as is
    (the same object). Raises KeyError for a path that is not in ``tree``."""
    leaves = leaf_paths(tree)
    for path in fns:
        if path not in leaves:
            raise _missing(path, list(leaves))

    def visit(keypath, leaf):
        fn = fns.get(normalize_path(keypath))
        return leaf if fn is None else fn(leaf)

    return jax.tree_util.tree_map_with_path(visit, tree)


# --- modules --------------------------------------------------------------------------------


class DenseUnit(nnx.Module):
    """``LN(W x + b)``: a Dense layer with an optional LayerNorm on its outputs."""

    def __init__(self, in_dim: int, out_dim: int, *, layer_norm: bool, kernel_init: Initializer,
                 rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_dim, out_dim, kernel_init=kernel_init,
                                bias_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.norm = nnx.LayerNorm(out_dim, rngs=rngs) if layer_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dense(x)
        return self.norm(h) if self.norm is not None else h


class ConvUnit(nnx.Module):
    """``LN(Conv(x))``: a 3x3 stride-1 VALID convolution with an optional per-position LayerNorm
    over its output channels."""

    def __init__(self, in_ch: int, out_ch: int, *, layer_norm: bool, kernel_init: Initializer,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_ch, out_ch, kernel_size=(3, 3), strides=(1, 1), padding="VALID",
                             kernel_init=kernel_init, bias_init=nnx.initializers.zeros_init(),
                             rngs=rngs)
        self.norm = nnx.LayerNorm(out_ch, rngs=rngs) if layer_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(x)
        return self.norm(h) if self.norm is not None else h


class Network(nnx.Module):
    """Shared pieces: config, activation, layer descriptions, the optional conv torso."""

    config: NetworkConfig
    output_kernel: Path = ("head", "kernel")  # the output layer: never a neuron layer
    output_bias: Path = ("head", "bias")

    def _act(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.config.activation](x)

    def _init_torso(self, in_dim: int, rngs: nnx.Rngs) -> int:
        """Build ``self.torso`` (``None`` without a conv encoder); returns the MLP's input size."""
        c = self.config
        if c.encoder != "conv":
            self.torso = None
            return in_dim
        h, w = c.image_hw
        if in_dim % (h * w):
            raise ValueError(f"NetworkConfig.encoder='conv': observation size {in_dim} is not a "
                             f"multiple of image_hw {h} x {w} = {h * w}; set image_hw to the "
                             f"observation's height and width")
        chans = (in_dim // (h * w), *c.conv_channels)
        self.torso = nnx.List([ConvUnit(chans[i], chans[i + 1], layer_norm=c.layer_norm,
                                        kernel_init=KERNEL_INITS[c.kernel_init], rngs=rngs)
                               for i in range(len(c.conv_channels))])
        n = len(c.conv_channels)
        return (h - 2 * n) * (w - 2 * n) * chans[-1]

    def _torso(self, x: jax.Array, acts: dict) -> jax.Array:
        """The conv torso on flat observations ``[..., H W C]`` -> flat features ``[..., D]``."""
        if self.torso is None:
            return x
        h, w = self.config.image_hw
        lead = x.shape[:-1]
        x = x.reshape((-1, h, w, x.shape[-1] // (h * w)))
        for i, unit in enumerate(self.torso):
            x = self._act(unit(x))
            acts[f"torso/{i}"] = x.reshape(lead + x.shape[1:])
        return x.reshape(lead + (-1,))

    def _torso_layers(self) -> list[NeuronLayer]:
        c = self.config
        if c.encoder != "conv":
            return []
        n = len(c.conv_channels)
        init = KERNEL_INITS[c.kernel_init]
        return [NeuronLayer(
            name=f"torso/{i}", width=c.conv_channels[i], kernel=("torso", i, "conv", "kernel"),
            bias=("torso", i, "conv", "bias"),
            norm_scale=("torso", i, "norm", "scale") if c.layer_norm else None,
            norm_bias=("torso", i, "norm", "bias") if c.layer_norm else None,
            outgoing=(("torso", i + 1, "conv", "kernel"),) if i + 1 < n else None,
            kernel_init=init) for i in range(n)]

    def _layer(self, module_path: Path, outgoing: tuple[Path, ...] | None) -> NeuronLayer:
        c = self.config
        return NeuronLayer(
            name=path_name(module_path), width=c.width,
            kernel=module_path + ("dense", "kernel"), bias=module_path + ("dense", "bias"),
            norm_scale=module_path + ("norm", "scale") if c.layer_norm else None,
            norm_bias=module_path + ("norm", "bias") if c.layer_norm else None,
            outgoing=outgoing, kernel_init=KERNEL_INITS[c.kernel_init])


class MLP(Network):
    """``kind="mlp"``: see the module docstring."""

    def __init__(self, config: NetworkConfig, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.config = config
        init = KERNEL_INITS[config.kernel_init]
        in_dim = self._init_torso(in_dim, rngs)
        dims = [in_dim] + [config.width] * config.depth
        self.hidden = nnx.List([DenseUnit(a, b, layer_norm=config.layer_norm, kernel_init=init,
                                          rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.head = nnx.Linear(config.width, out_dim, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array, return_activations: bool = False):
        acts = {}
        x = self._torso(x, acts)
        for i, unit in enumerate(self.hidden):
            x = self._act(unit(x))
            acts[f"hidden/{i}"] = x
        acts["features"] = x
        out = self.head(x)
        return (out, acts) if return_activations else out

    def neuron_layers(self) -> tuple[NeuronLayer, ...]:
        n = self.config.depth
        nxt = [("hidden", i + 1, "dense", "kernel") for i in range(n - 1)] + [self.output_kernel]
        return tuple(self._torso_layers()
                     + [self._layer(("hidden", i), (nxt[i],)) for i in range(n)])


class Block(nnx.Module):
    """Residual branch ``r = LN(W_out act(LN(W_in u)))`` (BRO block)."""

    def __init__(self, width: int, *, layer_norm: bool, kernel_init: Initializer, rngs: nnx.Rngs):
        self.inner = DenseUnit(width, width, layer_norm=layer_norm, kernel_init=kernel_init,
                               rngs=rngs)
        self.out = DenseUnit(width, width, layer_norm=layer_norm, kernel_init=kernel_init,
                             rngs=rngs)


class ResidualMLP(Network):
    """``kind="residual"`` or ``"multiskip"``: see the module docstring."""

    def __init__(self, config: NetworkConfig, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.config = config
        init = KERNEL_INITS[config.kernel_init]
        in_dim = self._init_torso(in_dim, rngs)
        self.encoder = DenseUnit(in_dim, config.width, layer_norm=config.layer_norm,
                                 kernel_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(config.width, layer_norm=config.layer_norm,
                                      kernel_init=init, rngs=rngs) for _ in range(config.depth)])
        self.head = nnx.Linear(config.width, out_dim, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array, return_activations: bool = False):
        acts = {}
        e = self._act(self.encoder(self._torso(x, acts)))
        acts["encoder"] = e
        z = e
        for i, block in enumerate(self.blocks):
            u = z + e if (self.config.kind == "multiskip" and i > 0) else z
            a = self._act(block.inner(u))
            r = block.out(a)
            acts[f"blocks/{i}/inner"] = a
            acts[f"blocks/{i}/out"] = r
            z = z + r
        acts["features"] = z
        out = self.head(z)
        return (out, acts) if return_activations else out

    def neuron_layers(self) -> tuple[NeuronLayer, ...]:
        layers = self._torso_layers() + [self._layer(("encoder",), None)]
        for i in range(self.config.depth):
            reader = ("blocks", i, "out", "dense", "kernel")  # the only reader of the inner neurons
            layers.append(self._layer(("blocks", i, "inner"), (reader,)))
            layers.append(self._layer(("blocks", i, "out"), None))
        return tuple(layers)


class MultiSkipResidualMLP(ResidualMLP):
    """``kind="multiskip_paper"``: see the module docstring (Castanyer et al. 2025)."""

    def __call__(self, x: jax.Array, return_activations: bool = False):
        acts = {}
        g = self.encoder(self._torso(x, acts))  # h_0 = LN(W_in x + b): no activation
        acts["encoder"] = g
        z = g
        for i, block in enumerate(self.blocks):
            a = self._act(block.inner(self._act(z)))
            r = block.out(a)
            acts[f"blocks/{i}/inner"] = a
            acts[f"blocks/{i}/out"] = r
            z = z + r + g
        acts["features"] = z
        out = self.head(z)
        return (out, acts) if return_activations else out


def make_network(config: NetworkConfig, in_dim: int, out_dim: int, rngs: nnx.Rngs) -> Network:
    """The network ``config`` describes, mapping ``[..., in_dim]`` to ``[..., out_dim]``.

    ``model(x)`` returns the output; ``model(x, return_activations=True)`` returns
    ``(output, {layer name: post-activation hidden values, "features": input of the head})``;
    ``model.neuron_layers()`` says where each layer's neurons live in the params pytree."""
    if config.kind == "mlp":
        return MLP(config, in_dim, out_dim, rngs=rngs)
    if config.kind == "multiskip_paper":
        return MultiSkipResidualMLP(config, in_dim, out_dim, rngs=rngs)
    return ResidualMLP(config, in_dim, out_dim, rngs=rngs)

"""ViT backbone: sizes, config errors, remat, parity with the reference's VisionTransformer and
the timm ImageNet conversion (against the reference's own `vitconvert` + `resizeposembed` load).

The reference is built with random weights; the parameters it initialises to constants (cls
token, position embedding, LayerNorms, attention biases) are drawn at random first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert
from memseg_jax.models.backbones import vit
from tests import reference_utils as ru

TINY = dict(img_size=(128, 128), patch_size=16, embed_dims=64, num_layers=3, num_heads=4,
            mlp_ratio=4, out_indices=(0, 2))


def _model(**kwargs):
  return vit.build(dict(TINY, **kwargs))


@pytest.mark.parametrize('size', [(128, 128), (65, 97), (16, 200)])
def test_outputs_are_ceil_of_size_over_16_with_cls_removed(size):
  model = _model()
  x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  outputs, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x), x)
  grid = tuple(-(-s // 16) for s in size)
  assert [o.shape for o in outputs] == [(2, *grid, 64)] * 2
  assert variables['params']['pos_embed'].shape == (1, 1 + 8 * 8, 64)
  assert vit.output_strides(TINY) == (16, 16)


@pytest.mark.parametrize('key,value,message', [
    ('num_heads', 5, 'does not divide'),
    ('out_indices', (0, 3), 'block indices'),
    ('img_size', (8, 128), 'two integers'),
    ('drop_rate', 1.0, r'in \[0, 1\)'),
    ('embed_dims', 0, 'positive integer'),
])
def test_check_config_names_the_bad_key(key, value, message):
  with pytest.raises(ValueError, match=f'config.model.backbone.{key}=.*{message}'):
    vit.check_config(dict(TINY, **{key: value}))


def test_remat_gives_the_same_outputs_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 48, 3))
  plain, remat = _model(num_layers=2), vit.build(dict(TINY, num_layers=2, remat=True))
  variables = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      remat.init(jax.random.PRNGKey(0), x))

  def loss(model, params):
    return sum(jnp.sum(jnp.sin(o)) for o in model.apply({'params': params}, x))

  g1 = jax.jit(jax.grad(lambda p: loss(plain, p)))(variables['params'])
  g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(variables['params'])
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    # Same math; XLA may fuse the recomputed forward differently (float32 rounding only).
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(a)).max()


def test_dropout_is_active_in_training_only_when_configured():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
  variables = _model().init(jax.random.PRNGKey(0), x)
  rngs = {'dropout': jax.random.PRNGKey(2)}
  ref = _model().apply(variables, x)
  same = vit.build(dict(TINY), train=True).apply(variables, x, rngs=rngs)
  dropped = vit.build(dict(TINY, drop_rate=0.1), train=True).apply(variables, x, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(ref[-1]), np.asarray(same[-1]))
  assert np.abs(np.asarray(dropped[-1]) - np.asarray(ref[-1])).max() > 1e-3


# ------------------------------------------------------------------------ reference comparison
torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')


def _reference_backbone(seed=0, **sizes):
  ru.import_ssseg_builder()          # the torchvision stand-in, before ssseg is imported
  from ssseg.modules.models.backbones.vit import VisionTransformer
  torch.manual_seed(seed)
  cfg = ru.vit_backbone_cfg(**dict(TINY, **sizes))
  cfg.pop('type')
  cfg.pop('selected_indices')
  model = VisionTransformer(**cfg).eval()
  gen = torch.Generator().manual_seed(seed + 1)

  class Holder(torch.nn.Module):     # randomize_vit reads `backbone_net`
    def __init__(self):
      super().__init__()
      self.backbone_net = model

  with torch.no_grad():
    ru.randomize_vit(Holder(), gen)
  return model


def _ours(model, images_nchw, **sizes):
  shapes = jax.eval_shape(lambda: vit.build(dict(TINY, **sizes)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  flat = {('params', *k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
          for k in [tuple(p.key for p in k)]}
  variables = convert.convert_state_dict(model.state_dict(), flat, 'the ViT state_dict', 'vit')
  outputs = vit.build(dict(TINY, **sizes)).apply(variables,
                                                 jnp.asarray(ru.nchw_to_nhwc(images_nchw)))
  return [ru.nhwc_to_nchw(np.asarray(o)) for o in outputs]


@pytest.mark.parametrize('size', [(128, 128), (72, 100), (32, 512)])
def test_backbone_matches_reference(size):
  # 72x100: padded to 80x112, a 5x7 grid (embedding resized). 32x512: a 2x32 grid with as many
  # tokens as the 8x8 embedding, which the reference then adds as it is (no resize); so do we.
  model = _reference_backbone()
  images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = [o.numpy() for o in model(images)]
  ours = _ours(model, images.numpy())
  assert len(ref) == len(ours) == 2
  for r, o in zip(ref, ours):
    assert r.shape == o.shape
    err = np.abs(o - r).max()
    print(f'ViT outputs {size}: max abs diff {err:.3g} (max abs {np.abs(r).max():.3g})')
    assert err <= 1e-5 * np.abs(r).max()


def _timm_state_dict(gen, dims=64, layers=3, grid=6, classes=10):
  """A state_dict in timm's ViT layout (keys and shapes of jx_vit_large_p16_384, smaller)."""
  rand = lambda *shape: torch.randn(*shape, generator=gen)
  sd = {'cls_token': rand(1, 1, dims), 'pos_embed': rand(1, 1 + grid * grid, dims),
        'patch_embed.proj.weight': rand(dims, 3, 16, 16), 'patch_embed.proj.bias': rand(dims),
        'norm.weight': rand(dims), 'norm.bias': rand(dims),
        'head.weight': rand(classes, dims), 'head.bias': rand(classes)}
  for i in range(layers):
    p = f'blocks.{i}.'
    sd.update({p + 'norm1.weight': rand(dims), p + 'norm1.bias': rand(dims),
               p + 'attn.qkv.weight': rand(3 * dims, dims), p + 'attn.qkv.bias': rand(3 * dims),
               p + 'attn.proj.weight': rand(dims, dims), p + 'attn.proj.bias': rand(dims),
               p + 'norm2.weight': rand(dims), p + 'norm2.bias': rand(dims),
               p + 'mlp.fc1.weight': rand(4 * dims, dims), p + 'mlp.fc1.bias': rand(4 * dims),
               p + 'mlp.fc2.weight': rand(dims, 4 * dims), p + 'mlp.fc2.bias': rand(dims)})
  return sd


def test_timm_key_mapping_is_the_references_vitconvert():
  from ssseg.modules.models.backbones.vit import VisionTransformer
  sd = _timm_state_dict(torch.Generator().manual_seed(0))
  ref = VisionTransformer.vitconvert(sd)
  ours = {vit.timm_to_reference_key(k): k for k in sd if vit.timm_to_reference_key(k)}
  assert set(ours) == set(ref)
  assert all(ref[new] is sd[old] for new, old in ours.items())


def test_imagenet_conversion_matches_the_references_pretrained_load(tmp_path):
  """24x24 -> 32x32 at ViT-L; here 6x6 -> 8x8: converted values equal the reference's load."""
  sd = _timm_state_dict(torch.Generator().manual_seed(0))
  path = str(tmp_path / 'timm_vit.pth')
  torch.save(sd, path)
  model = _reference_backbone()
  model.loadpretrainedweights('jx_vit_large_p16_384', pretrained_model_path=path)
  ref_sd = ru.to_numpy_state_dict(model)
  # What the reference's strict=False load leaves unused (head.* is dropped by vitconvert).
  from ssseg.modules.models.backbones.vit import VisionTransformer
  unused = set(VisionTransformer.vitconvert(sd)) - set(model.state_dict())

  converted, ignored = vit.imagenet_state_dict(dict(sd), dict(TINY))
  assert sorted(ignored) == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']
  assert sorted(unused) == ['ln1.bias', 'ln1.weight']
  assert converted['pos_embed'].shape == (1, 1 + 8 * 8, 64)

  config = ru.project_config(overrides={
      'model.backbone.type': 'vit', 'model.backbone.selected_indices': (0, 1),
      **{f'model.backbone.{k}': v for k, v in TINY.items()}})
  variables = convert.convert_imagenet({'state_dict': sd}, config)
  expected = {('params', *k): v for k, v in convert.variable_shapes(config).items()
              if k[1] == 'backbone_net'}
  flat = {('params', 'backbone_net', *tuple(p.key for p in k)): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(
              variables['params']['backbone_net'])[0]}
  assert len(flat) == len(ref_sd) == len(expected)
  for key, value in flat.items():
    torch_name = convert.torch_key(key, 'vit')[len('backbone_net.'):]
    ref = ref_sd[torch_name]
    ref = ref.transpose(2, 3, 1, 0) if ref.ndim == 4 else ref
    ref = ref.T if key[-1] == 'kernel' and ref.ndim == 2 else ref
    tol = 1e-6 * np.abs(ref).max() if torch_name == 'pos_embed' else 0.0
    np.testing.assert_allclose(value, ref, rtol=0, atol=tol, err_msg=torch_name)



def test_training_starts_from_a_timm_checkpoint_named_in_the_config(tmp_path):
  """config.model.backbone.pretrained = the timm .pth: the backbone is the converted file."""
  from memseg_jax import train   # pylint: disable=import-outside-toplevel
  sd = _timm_state_dict(torch.Generator().manual_seed(1))
  path = str(tmp_path / 'timm_vit.pth')
  torch.save(sd, path)
  config = ru.project_config(overrides={
      'model.backbone.type': 'vit', 'model.backbone.selected_indices': (0, 1),
      'model.backbone.pretrained': path, 'data.crop_size': (64, 64),
      **{f'model.backbone.{k}': v for k, v in TINY.items()}})
  variables = train.init_variables(config, jax.random.PRNGKey(0))
  backbone = variables['params']['backbone_net']
  np.testing.assert_array_equal(np.asarray(backbone['cls_token']), sd['cls_token'].numpy())
  np.testing.assert_array_equal(
      np.asarray(backbone['layers_2']['attn']['attn']['in_proj_weight']),
      sd['blocks.2.attn.qkv.weight'].numpy())
  np.testing.assert_array_equal(np.asarray(backbone['layers_0']['ffn']['layers_1']['kernel']),
                                sd['blocks.0.mlp.fc2.weight'].numpy().T)
  assert 'backbone_net' not in variables['batch_stats']

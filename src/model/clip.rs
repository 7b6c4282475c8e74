//! The CLIP dual encoder (`transformers`' `CLIPModel`) in candle.
//!
//! One file per model, as in candle-transformers, but owned here because clipft needs what the
//! stock model does not give: `hidden_act` from the config for both towers, `transformers`' exact
//! EOS pooling, and a vision tower that stays differentiable end to end for fine-tuning
//! (candle's fused layer-norm and softmax kernels have no backward pass, so [`LayerNorm`] and
//! [`softmax`] switch to composed ops whenever the graph is being tracked).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use super::config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};

/// Layer normalisation that keeps gradients flowing.
///
/// candle-nn's `LayerNorm::forward` takes a fused kernel on contiguous input that records no
/// backward op, which silently stops gradients. That kernel is only used when nothing in the
/// computation is tracked (inference); otherwise clipft's own fused op with a backward pass
/// ([`super::kernels::layer_norm`], CPU f32) or the formula built from differentiable ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.track_op() || self.weight.track_op() || self.bias.track_op() {
            if let Some(y) = super::kernels::layer_norm(xs, &self.weight, &self.bias, self.eps) {
                return y;
            }
            let dtype = xs.dtype();
            // Statistics in at least f32 (f64 stays f64, for gradient checks).
            let x = match dtype {
                DType::F16 | DType::BF16 => xs.to_dtype(DType::F32)?,
                _ => xs.clone(),
            };
            let mean = x.mean_keepdim(D::Minus1)?;
            let x = x.broadcast_sub(&mean)?;
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            x.to_dtype(dtype)?
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// A dense layer `x·Wᵀ + b` over the last dimension.
///
/// candle-nn's `Linear` multiplies a `[B, T, H]` input batch by batch (B small GEMMs of T rows);
/// flattening to `[B·T, H]` makes it one large GEMM, which the CPU backend runs several times
/// faster, with the bias fused into it ([`super::kernels::dense_bias`]). Differentiable, so it
/// trains as well.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: if bias {
                Some(vb.get(out_dim, "bias")?)
            } else {
                None
            },
        })
    }
}

/// `x·Wᵀ (+ b)` for a 2-D `x`.
fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) => super::kernels::dense_bias(x, w, b),
        None => x.matmul(&w.t()?),
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let in_dim = *dims.last().expect("non-scalar input");
        let rows = xs.elem_count() / in_dim;
        let y = dense(
            &xs.reshape((rows, in_dim))?,
            &self.weight,
            self.bias.as_ref(),
        )?;
        let mut out = dims;
        *out.last_mut().expect("non-scalar input") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// Softmax over the last dimension; candle's fused kernel for inference, a differentiable one
/// when tracked ([`super::kernels::softmax_last_dim`] on CPU f32, composed ops elsewhere).
pub fn softmax(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        if let Some(y) = super::kernels::softmax_last_dim(xs) {
            return y;
        }
        let max = xs.max_keepdim(D::Minus1)?.detach();
        let e = xs.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

fn activate(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => super::kernels::quick_gelu(xs),
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluNew => xs.gelu(),
    }
}

/// The query, key and value projections.
#[derive(Debug, Clone)]
enum Qkv {
    /// Three layers, as in the checkpoint: used when the weights are trained (gradients per
    /// tensor, and the optimiser updates the checkpoint's own variables).
    Separate { q: Linear, k: Linear, v: Linear },
    /// One `[3H, H]` layer with the attention scale folded into the query rows: one GEMM that
    /// reads the input once instead of three, and one head-split copy instead of three.
    Fused(Linear),
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, hidden: usize, num_heads: usize) -> Result<Self> {
        let lin = |name| Linear::new(vb.pp(name), hidden, hidden, true);
        let head_dim = hidden / num_heads;
        let (q, k, v) = (lin("q_proj")?, lin("k_proj")?, lin("v_proj")?);
        let qkv = if q.weight.track_op() || k.weight.track_op() || v.weight.track_op() {
            Qkv::Separate { q, k, v }
        } else {
            let scale = (head_dim as f64).powf(-0.5);
            let bias = |l: &Linear| l.bias.clone().expect("q/k/v projections have biases");
            Qkv::Fused(Linear {
                weight: Tensor::cat(&[&(&q.weight * scale)?, &k.weight, &v.weight], 0)?,
                bias: Some(Tensor::cat(
                    &[&(bias(&q) * scale)?, &bias(&k), &bias(&v)],
                    0,
                )?),
            })
        };
        Ok(Self {
            qkv,
            out_proj: lin("out_proj")?,
            num_heads,
            head_dim,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                let scale = (hd as f64).powf(-0.5);
                (
                    self.split_heads(&(q.forward(xs)? * scale)?)?,
                    self.split_heads(&k.forward(xs)?)?,
                    self.split_heads(&v.forward(xs)?)?,
                )
            }
            Qkv::Fused(qkv) => {
                // [B, T, 3H] -> [3, B, heads, T, head_dim] in one copy.
                let y = qkv
                    .forward(xs)?
                    .reshape((b, t, 3, nh, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (y.get(0)?, y.get(1)?, y.get(2)?)
            }
        };
        self.attend(&q, &k, &v, mask)
    }

    /// `[B, T, H]` -> `[B, heads, T, head_dim]`, contiguous.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Scaled queries, keys and values (`[B, heads, T, head_dim]`) to the output projection of
    /// the attention, `[B, Tq, H]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, tq, _) = q.dims4()?;
        let mut attn = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            attn = attn.broadcast_add(mask)?;
        }
        let attn = softmax(&attn)?;
        let out =
            attn.matmul(v)?
                .transpose(1, 2)?
                .reshape((b, tq, self.num_heads * self.head_dim))?;
        self.out_proj.forward(&out)
    }

    /// Attention output for one query row per sequence, `[B, 1, H]`: keys and values from every
    /// row of `xs` `[B, T, H]`, queries from `q_xs` `[B, 1, H]`, `mask` `[B, 1, 1, T]`.
    fn forward_pooled(&self, xs: &Tensor, q_xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                let scale = (hd as f64).powf(-0.5);
                (
                    self.split_heads(&(q.forward(q_xs)? * scale)?)?,
                    self.split_heads(&k.forward(xs)?)?,
                    self.split_heads(&v.forward(xs)?)?,
                )
            }
            Qkv::Fused(qkv) => {
                // Rows [0, H) of the fused layer are the (pre-scaled) queries, [H, 3H) keys and
                // values.
                let part = |from: usize, n: usize| -> Result<Linear> {
                    Ok(Linear {
                        weight: qkv.weight.narrow(0, from, n)?,
                        bias: qkv
                            .bias
                            .as_ref()
                            .map(|b| b.narrow(0, from, n))
                            .transpose()?,
                    })
                };
                let kv = part(h, 2 * h)?
                    .forward(xs)?
                    .reshape((b, t, 2, nh, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (
                    self.split_heads(&part(0, h)?.forward(q_xs)?)?,
                    kv.get(0)?,
                    kv.get(1)?,
                )
            }
        };
        self.attend(&q, &k, &v, mask)
    }
}

/// Row `pos[i]` of each sequence `i` of `xs` `[B, T, H]`, as `[B, 1, H]`.
fn select_rows(xs: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (b, t, h) = xs.dims3()?;
    if pos.iter().all(|&p| p == 0) {
        return xs.narrow(1, 0, 1);
    }
    let idx: Vec<u32> = pos
        .iter()
        .enumerate()
        .map(|(i, &p)| (i * t + p) as u32)
        .collect();
    let idx = Tensor::from_vec(idx, b, xs.device())?;
    xs.reshape((b * t, h))?
        .index_select(&idx, 0)?
        .reshape((b, 1, h))
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(
        vb: VarBuilder,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(vb.pp("self_attn"), hidden, heads)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), hidden, eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), hidden, inter, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), inter, hidden, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), hidden, eps)?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        self.mlp_block(&(xs + h)?)
    }

    /// `x + MLP(LN2(x))`, the second half of the layer.
    fn mlp_block(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(&self.layer_norm2.forward(xs)?)?;
        let h = self.fc2.forward(&activate(self.act, &h)?)?;
        xs + h
    }

    /// The layer's output at row `pos[i]` of each sequence only, `[B, 1, H]`: the same values as
    /// `forward` gives there (attention still reads every row), without the other rows' MLP.
    fn forward_pooled(&self, xs: &Tensor, mask: Option<&Tensor>, pos: &[usize]) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(xs)?;
        let h = self
            .self_attn
            .forward_pooled(&normed, &select_rows(&normed, pos)?, mask)?;
        self.mlp_block(&(select_rows(xs, pos)? + h)?)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(
        vb: VarBuilder,
        n: usize,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        let layers = (0..n)
            .map(|i| {
                EncoderLayer::new(vb.pp(format!("layers.{i}")), hidden, inter, heads, eps, act)
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// The last layer's output at row `pos[i]` of each sequence, `[B, 1, H]`: CLIP pools one
    /// token, so the last layer computes its attention and MLP for that row alone (about 7% of
    /// a ViT-B/32 forward). `mask`, if any, is the `[T, T]` additive attention mask.
    fn forward_pooled(&self, xs: &Tensor, mask: Option<&Tensor>, pos: &[usize]) -> Result<Tensor> {
        let Some((last, rest)) = self.layers.split_last() else {
            return select_rows(xs, pos);
        };
        let xs = rest
            .iter()
            .try_fold(xs.clone(), |xs, l| l.forward(&xs, mask))?;
        let mask_rows = match mask {
            Some(m) => {
                let (t, _) = m.dims2()?;
                let idx = Tensor::from_vec(
                    pos.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                    pos.len(),
                    m.device(),
                )?;
                Some(m.index_select(&idx, 0)?.reshape((pos.len(), 1, 1, t))?)
            }
            None => None,
        };
        last.forward_pooled(&xs, mask_rows.as_ref(), pos)
    }
}

/// `CLIPTextTransformer` plus `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    projection: Linear,
    cfg: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, projection_dim: usize) -> Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                emb.pp("token_embedding"),
            )?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, cfg.hidden_size),
                "position_embedding.weight",
            )?,
            encoder: Encoder::new(
                tm.pp("encoder"),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                cfg.hidden_act,
            )?,
            final_layer_norm: LayerNorm::new(
                tm.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            projection: Linear::new(
                vb.pp("text_projection"),
                cfg.hidden_size,
                projection_dim,
                false,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// Position of the pooled token in each row, exactly as `transformers` chooses it: the legacy
    /// configs (`eos_token_id == 2`) take the argmax of the ids (the EOS id is the largest in the
    /// CLIP vocabulary), newer ones the first occurrence of `eos_token_id`.
    pub fn pooled_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    // First index of the maximum, as torch.argmax returns.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&x| x == self.cfg.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect()
    }

    /// Text features (`get_text_features`): `[B, T]` u32 token ids (already truncated to the
    /// context length) to `[B, projection_dim]`, unnormalised.
    pub fn forward_ids(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let b = ids.len();
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || t == 0 {
            candle_core::bail!("text encoder needs at least one non-empty token sequence")
        }
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "token sequence of length {t} exceeds the model's context length {}",
                self.cfg.max_position_embeddings
            )
        }
        // Pad every row to `t`; with the causal mask, tokens after EOS never reach the pooled one.
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|r| {
                r.iter().copied().chain(std::iter::repeat_n(
                    self.cfg.pad_token_id.min(self.cfg.vocab_size as u32 - 1),
                    t - r.len(),
                ))
            })
            .collect();
        let input = Tensor::from_vec(flat, (b, t), device)?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let xs = self.token_embedding.forward(&input)?.broadcast_add(&pos)?;
        let mask = causal_mask(t, xs.dtype(), device)?;
        let pooled = self
            .encoder
            .forward_pooled(&xs, Some(&mask), &self.pooled_positions(ids))?;
        let pooled = self.final_layer_norm.forward(&pooled.squeeze(1)?)?;
        self.projection.forward(&pooled)
    }
}

fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// `CLIPVisionTransformer` plus `visual_projection`.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    /// Patch-embedding convolution weight flattened to `[hidden, C*P*P]`: the convolution has
    /// stride = kernel, so it is a plain matmul over non-overlapping patches (no im2col).
    patch_weight: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    projection: Linear,
    cfg: ClipVisionConfig,
}

impl ClipVisionTransformer {
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig, projection_dim: usize) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let patch_weight = emb
            .get((h, c, p, p), "patch_embedding.weight")?
            .reshape((h, c * p * p))?;
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_weight,
            position_embedding: emb.get((cfg.num_patches() + 1, h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(vm.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            encoder: Encoder::new(
                vm.pp("encoder"),
                cfg.num_hidden_layers,
                h,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                cfg.hidden_act,
            )?,
            post_layernorm: LayerNorm::new(vm.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            projection: Linear::new(vb.pp("visual_projection"), h, projection_dim, false)?,
            cfg: cfg.clone(),
        })
    }

    /// Image features (`get_image_features`): `[B, C, S, S]` normalised pixels to
    /// `[B, projection_dim]`, unnormalised.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixels.dims4()?;
        let (p, s) = (self.cfg.patch_size, self.cfg.image_size);
        if c != self.cfg.num_channels || hh != s || ww != s {
            candle_core::bail!(
                "vision tower expects [B, {}, {s}, {s}] pixels, got {:?}",
                self.cfg.num_channels,
                pixels.dims()
            )
        }
        let g = s / p;
        let hidden = self.cfg.hidden_size;
        let pixels = pixels.to_dtype(self.patch_weight.dtype())?;
        // [B, C, g, P, g, P] -> [B, g, g, C, P, P] -> [B*g*g, C*P*P]
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let patches = dense(&patches, &self.patch_weight, None)?.reshape((b, g * g, hidden))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let cls = self.encoder.forward_pooled(&xs, None, &vec![0; b])?;
        let pooled = self.post_layernorm.forward(&cls.squeeze(1)?)?;
        self.projection.forward(&pooled)
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }
}

/// Both towers of a CLIP checkpoint.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text: ClipTextTransformer,
    pub vision: ClipVisionTransformer,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        Ok(Self {
            text: ClipTextTransformer::new(vb.clone(), &config.text_config, config.projection_dim)?,
            vision: ClipVisionTransformer::new(vb, &config.vision_config, config.projection_dim)?,
            config: config.clone(),
        })
    }

    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixels)
    }

    pub fn text_features(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        self.text.forward_ids(ids, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_paths_agree_and_slow_one_has_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
        let w = candle_core::Var::from_tensor(&Tensor::randn(1f32, 0.1, 8, &dev).unwrap()).unwrap();
        let b = Tensor::randn(0f32, 0.1, 8, &dev).unwrap();
        let fused = LayerNorm {
            weight: w.as_tensor().detach(),
            bias: b.clone(),
            eps: 1e-5,
        };
        let tracked = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b,
            eps: 1e-5,
        };
        let a = fused.forward(&x).unwrap();
        let y = tracked.forward(&x).unwrap();
        let diff = crate::testutil::max_abs_diff(&a, &y);
        assert!(diff < 1e-5, "{diff}");
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).is_some(),
            "layer norm weight received no gradient"
        );
    }

    #[test]
    fn softmax_paths_agree() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 7), &dev).unwrap())
            .unwrap();
        let a = softmax(&x.as_tensor().detach()).unwrap();
        let b = softmax(x.as_tensor()).unwrap();
        let diff = crate::testutil::max_abs_diff(&a, &b);
        assert!(diff < 1e-6, "{diff}");
        let grads = (b.narrow(1, 0, 1).unwrap().sum_all().unwrap())
            .backward()
            .unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }
}

//! `config.json` of a Hugging Face `CLIPModel`, as serde structs.
//!
//! Field names and defaults follow `transformers`' `CLIPTextConfig` / `CLIPVisionConfig`, so any
//! CLIP ViT checkpoint (B/32, B/16, L/14, L/14-336, LAION variants) loads without a preset.

use serde::{Deserialize, Serialize};

/// Activation function of the MLP blocks (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, used by the OpenAI checkpoints.
    QuickGelu,
    /// Exact (erf) GELU, used by most LAION/OpenCLIP conversions.
    #[serde(alias = "gelu_python")]
    Gelu,
    /// Tanh approximation of GELU (`transformers` has five names for the one formula).
    #[serde(
        alias = "gelu_pytorch_tanh",
        alias = "gelu_fast",
        alias = "gelu_accurate",
        alias = "gelu_python_tanh"
    )]
    GeluNew,
}

fn default_text_vocab() -> usize {
    49408
}
fn d512() -> usize {
    512
}
fn d2048() -> usize {
    2048
}
fn d12() -> usize {
    12
}
fn d8() -> usize {
    8
}
fn d77() -> usize {
    77
}
fn d768() -> usize {
    768
}
fn d3072() -> usize {
    3072
}
fn d224() -> usize {
    224
}
fn d32() -> usize {
    32
}
fn d3() -> usize {
    3
}
fn quick_gelu() -> Activation {
    Activation::QuickGelu
}
fn eps() -> f64 {
    1e-5
}
fn eos() -> u32 {
    49407
}
fn bos() -> u32 {
    49406
}
fn pad() -> u32 {
    1
}
fn logit_scale_init() -> f64 {
    2.6592
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d512")]
    pub hidden_size: usize,
    #[serde(default = "d2048")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d8")]
    pub num_attention_heads: usize,
    #[serde(default = "d77")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "bos")]
    pub bos_token_id: u32,
    /// `2` selects the legacy pooling of `transformers` (argmax of the token ids).
    #[serde(default = "eos")]
    pub eos_token_id: u32,
    #[serde(default = "pad")]
    pub pad_token_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3")]
    pub num_channels: usize,
    #[serde(default = "d224")]
    pub image_size: usize,
    #[serde(default = "d32")]
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d512")]
    pub projection_dim: usize,
    #[serde(default = "logit_scale_init")]
    pub logit_scale_init_value: f64,
}

impl ClipTextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl ClipVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

impl ClipConfig {
    /// Parses `config.json` text. Accepts the full `CLIPModel` config; the legacy
    /// `text_config_dict`/`vision_config_dict` keys of old exports are used when the plain keys
    /// are absent.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let Some(obj) = value.as_object_mut() else {
            return Err(format!(
                "not a CLIP config: a JSON object expected, found {}",
                match value {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ));
        };
        for key in ["text_config", "vision_config"] {
            if obj.get(key).is_none_or(|v| v.is_null()) {
                if let Some(v) = obj.get(&format!("{key}_dict")).cloned() {
                    obj.insert(key.to_string(), v);
                }
            }
            // (serde would read an array as the struct's fields in order.)
            if obj.get(key).is_some_and(|v| !v.is_object() && !v.is_null()) {
                return Err(format!("`{key}` is not a JSON object"));
            }
        }
        // The error names the field at fault (`vision_config.layer_norm_eps: invalid type ...`).
        let cfg: ClipConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| format!("`{}`: {}", e.path(), e.inner()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let checks = [
            (
                t.hidden_size.is_multiple_of(t.num_attention_heads),
                "text_config.hidden_size must be divisible by num_attention_heads",
            ),
            (
                v.hidden_size.is_multiple_of(v.num_attention_heads),
                "vision_config.hidden_size must be divisible by num_attention_heads",
            ),
            (
                v.patch_size > 0 && v.image_size >= v.patch_size,
                "vision_config.image_size must be at least patch_size (and patch_size positive)",
            ),
            (
                t.max_position_embeddings >= 2,
                "text_config.max_position_embeddings must be at least 2",
            ),
            (self.projection_dim > 0, "projection_dim must be positive"),
            (
                v.num_channels == 3,
                "vision_config.num_channels must be 3: images are read as RGB",
            ),
            // (Else every feature is NaN, found only at the first image.)
            (
                t.layer_norm_eps.is_finite() && t.layer_norm_eps >= 0.0,
                "text_config.layer_norm_eps must be a finite number, not negative",
            ),
            (
                v.layer_norm_eps.is_finite() && v.layer_norm_eps >= 0.0,
                "vision_config.layer_norm_eps must be a finite number, not negative",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(msg.to_string());
            }
        }
        Ok(())
    }

    /// Short human-readable architecture name, e.g. `ViT-B/32 @224`.
    pub fn arch_name(&self) -> String {
        let v = &self.vision_config;
        let size = match (v.hidden_size, v.num_hidden_layers) {
            (768, 12) => "B",
            (1024, 24) => "L",
            (1280, 32) => "H",
            (1664, 48) => "bigG",
            (1408, 40) => "g",
            _ => "custom",
        };
        format!("ViT-{size}/{} @{}", v.patch_size, v.image_size)
    }

    /// OpenAI CLIP ViT-B/32, the shape of `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        ClipConfig {
            text_config: ClipTextConfig {
                vocab_size: 49408,
                hidden_size: 512,
                intermediate_size: 2048,
                num_hidden_layers: 12,
                num_attention_heads: 8,
                max_position_embeddings: 77,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
                bos_token_id: 49406,
                eos_token_id: 49407,
                pad_token_id: 49407,
            },
            vision_config: ClipVisionConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                num_channels: 3,
                image_size: 224,
                patch_size: 32,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }

    /// The tensors a `CLIPModel` checkpoint must hold, with their shapes (HF names).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let mut out = vec![
            (
                "text_model.embeddings.token_embedding.weight".to_string(),
                vec![t.vocab_size, t.hidden_size],
            ),
            (
                "text_model.embeddings.position_embedding.weight".to_string(),
                vec![t.max_position_embeddings, t.hidden_size],
            ),
            (
                "text_model.final_layer_norm.weight".into(),
                vec![t.hidden_size],
            ),
            (
                "text_model.final_layer_norm.bias".into(),
                vec![t.hidden_size],
            ),
            (
                "vision_model.embeddings.class_embedding".into(),
                vec![v.hidden_size],
            ),
            (
                "vision_model.embeddings.patch_embedding.weight".into(),
                vec![v.hidden_size, v.num_channels, v.patch_size, v.patch_size],
            ),
            (
                "vision_model.embeddings.position_embedding.weight".into(),
                vec![v.num_patches() + 1, v.hidden_size],
            ),
            (
                "vision_model.pre_layrnorm.weight".into(),
                vec![v.hidden_size],
            ),
            ("vision_model.pre_layrnorm.bias".into(), vec![v.hidden_size]),
            (
                "vision_model.post_layernorm.weight".into(),
                vec![v.hidden_size],
            ),
            (
                "vision_model.post_layernorm.bias".into(),
                vec![v.hidden_size],
            ),
            (
                "visual_projection.weight".into(),
                vec![self.projection_dim, v.hidden_size],
            ),
            (
                "text_projection.weight".into(),
                vec![self.projection_dim, t.hidden_size],
            ),
        ];
        let layers =
            |prefix: &str, n: usize, h: usize, i: usize, out: &mut Vec<(String, Vec<usize>)>| {
                for l in 0..n {
                    let p = format!("{prefix}.encoder.layers.{l}");
                    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                        out.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
                        out.push((format!("{p}.self_attn.{proj}.bias"), vec![h]));
                    }
                    for ln in ["layer_norm1", "layer_norm2"] {
                        out.push((format!("{p}.{ln}.weight"), vec![h]));
                        out.push((format!("{p}.{ln}.bias"), vec![h]));
                    }
                    out.push((format!("{p}.mlp.fc1.weight"), vec![i, h]));
                    out.push((format!("{p}.mlp.fc1.bias"), vec![i]));
                    out.push((format!("{p}.mlp.fc2.weight"), vec![h, i]));
                    out.push((format!("{p}.mlp.fc2.bias"), vec![h]));
                }
            };
        layers(
            "text_model",
            t.num_hidden_layers,
            t.hidden_size,
            t.intermediate_size,
            &mut out,
        );
        layers(
            "vision_model",
            v.num_hidden_layers,
            v.hidden_size,
            v.intermediate_size,
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields() {
        let cfg =
            ClipConfig::from_json(r#"{"text_config": {}, "vision_config": {"patch_size": 16}}"#)
                .unwrap();
        assert_eq!(cfg.vision_config.patch_size, 16);
        assert_eq!(cfg.vision_config.num_patches(), 196);
        assert_eq!(cfg.text_config.hidden_act, Activation::QuickGelu);
        assert_eq!(cfg.arch_name(), "ViT-B/16 @224");
    }

    #[test]
    fn legacy_dict_keys_and_activations() {
        let cfg = ClipConfig::from_json(
            r#"{"text_config": null, "text_config_dict": {"hidden_act": "gelu"},
                "vision_config_dict": {"hidden_act": "gelu_pytorch_tanh"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.text_config.hidden_act, Activation::Gelu);
        assert_eq!(cfg.vision_config.hidden_act, Activation::GeluNew);
        // `transformers`' other names for the same two formulas.
        for (name, act) in [
            ("gelu_python", Activation::Gelu),
            ("gelu_fast", Activation::GeluNew),
            ("gelu_accurate", Activation::GeluNew),
            ("gelu_python_tanh", Activation::GeluNew),
        ] {
            let json =
                format!(r#"{{"text_config": {{"hidden_act": "{name}"}}, "vision_config": {{}}}}"#);
            assert_eq!(
                ClipConfig::from_json(&json).unwrap().text_config.hidden_act,
                act
            );
        }
    }

    #[test]
    fn inconsistent_config_is_rejected() {
        let err = ClipConfig::from_json(
            r#"{"text_config": {"hidden_size": 30, "num_attention_heads": 4}, "vision_config": {}}"#,
        )
        .unwrap_err();
        assert!(err.contains("text_config.hidden_size"), "{err}");
        assert!(ClipConfig::from_json("{").is_err());
        assert!(ClipConfig::from_json(
            r#"{"text_config": {"hidden_act": "swish"}, "vision_config": {}}"#
        )
        .is_err());
        let err =
            ClipConfig::from_json(r#"{"text_config": {}, "vision_config": {"num_channels": 1}}"#)
                .unwrap_err();
        assert!(err.contains("num_channels"), "{err}");
        let err = ClipConfig::from_json(
            r#"{"text_config": {}, "vision_config": {"layer_norm_eps": -1}}"#,
        )
        .unwrap_err();
        assert!(err.contains("vision_config.layer_norm_eps"), "{err}");
        // A JSON document that is not an object says what was expected, and a bad field is
        // named.
        let err = ClipConfig::from_json("[1, 2]").unwrap_err();
        assert!(err.contains("a JSON object"), "{err}");
        let err =
            ClipConfig::from_json(r#"{"text_config": [1], "vision_config": {}}"#).unwrap_err();
        assert!(err.contains("`text_config` is not a JSON object"), "{err}");
        let err = ClipConfig::from_json(
            r#"{"text_config": {}, "vision_config": {"layer_norm_eps": null}}"#,
        )
        .unwrap_err();
        assert!(
            err.contains("`vision_config.layer_norm_eps`: invalid type: null"),
            "{err}"
        );
    }
}

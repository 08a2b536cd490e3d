//! `config.json` as published for the supported families, and refusals.

use lime_kernels::{Architecture, Config, Error, RopeScaling};
use std::path::Path;

fn parse(json: &str) -> Result<Config, Error> {
    Config::from_json(json, Path::new("config.json"))
}

const LLAMA2_7B: &str = r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":1,"eos_token_id":2,
 "hidden_act":"silu","hidden_size":4096,"initializer_range":0.02,"intermediate_size":11008,
 "max_position_embeddings":4096,"model_type":"llama","num_attention_heads":32,"num_hidden_layers":32,
 "num_key_value_heads":32,"pretraining_tp":1,"rms_norm_eps":1e-05,"rope_scaling":null,
 "tie_word_embeddings":false,"torch_dtype":"float16","transformers_version":"4.31.0.dev0",
 "use_cache":true,"vocab_size":32000}"#;

const LLAMA3_8B: &str = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
 "bos_token_id":128000,"eos_token_id":128001,"hidden_act":"silu","hidden_size":4096,
 "initializer_range":0.02,"intermediate_size":14336,"max_position_embeddings":8192,
 "model_type":"llama","num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,
 "pretraining_tp":1,"rms_norm_eps":1e-05,"rope_scaling":null,"rope_theta":500000.0,
 "tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,"vocab_size":128256}"#;

const LLAMA32_1B: &str = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
 "bos_token_id":128000,"eos_token_id":[128001,128008,128009],"head_dim":64,"hidden_act":"silu",
 "hidden_size":2048,"initializer_range":0.02,"intermediate_size":8192,"max_position_embeddings":131072,
 "mlp_bias":false,"model_type":"llama","num_attention_heads":32,"num_hidden_layers":16,
 "num_key_value_heads":8,"pretraining_tp":1,"rms_norm_eps":1e-05,
 "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
 "original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0,
 "tie_word_embeddings":true,"torch_dtype":"bfloat16","use_cache":true,"vocab_size":128256}"#;

const LLAMA33_70B: &str = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
 "bos_token_id":128000,"eos_token_id":[128001,128008,128009],"head_dim":128,"hidden_act":"silu",
 "hidden_size":8192,"initializer_range":0.02,"intermediate_size":28672,"max_position_embeddings":131072,
 "mlp_bias":false,"model_type":"llama","num_attention_heads":64,"num_hidden_layers":80,
 "num_key_value_heads":8,"pretraining_tp":1,"rms_norm_eps":1e-05,
 "rope_scaling":{"factor":8.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
 "original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0,
 "tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,"vocab_size":128256}"#;

const MISTRAL_7B_V01: &str = r#"{"architectures":["MistralForCausalLM"],"bos_token_id":1,"eos_token_id":2,
 "hidden_act":"silu","hidden_size":4096,"initializer_range":0.02,"intermediate_size":14336,
 "max_position_embeddings":32768,"model_type":"mistral","num_attention_heads":32,"num_hidden_layers":32,
 "num_key_value_heads":8,"rms_norm_eps":1e-05,"rope_theta":10000.0,"sliding_window":4096,
 "tie_word_embeddings":false,"torch_dtype":"bfloat16","use_cache":true,"vocab_size":32000}"#;

const QWEN2_05B: &str = r#"{"architectures":["Qwen2ForCausalLM"],"attention_dropout":0.0,"bos_token_id":151643,
 "eos_token_id":151643,"hidden_act":"silu","hidden_size":896,"initializer_range":0.02,
 "intermediate_size":4864,"max_position_embeddings":32768,"max_window_layers":24,"model_type":"qwen2",
 "num_attention_heads":14,"num_hidden_layers":24,"num_key_value_heads":2,"rms_norm_eps":1e-06,
 "rope_theta":1000000.0,"sliding_window":32768,"tie_word_embeddings":true,"torch_dtype":"bfloat16",
 "use_cache":true,"use_sliding_window":false,"vocab_size":151936}"#;

#[test]
fn llama_2() {
    let c = parse(LLAMA2_7B).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.rope_theta),
        (32, 128, 10_000.0)
    );
    assert_eq!(c.eos_token_ids, vec![2]);
    assert!(c.rope_scaling.is_none() && !c.tie_word_embeddings);
}

#[test]
fn llama_3_uses_grouped_query_attention() {
    let c = parse(LLAMA3_8B).unwrap();
    assert_eq!(
        (c.num_key_value_heads, c.kv_group(), c.rope_theta),
        (8, 4, 500_000.0)
    );
}

#[test]
fn llama_3_2_ties_embeddings_and_scales_rope() {
    let c = parse(LLAMA32_1B).unwrap();
    assert!(c.tie_word_embeddings);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
}

#[test]
fn llama_3_3_70b_has_the_papers_shape() {
    let c = parse(LLAMA33_70B).unwrap();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (80, 8192, 28672)
    );
    assert_eq!(
        (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size
        ),
        (64, 8, 128, 128256)
    );
    // KV bytes per token over all layers in bf16: 2 * 8 * 128 * 2 * 80 = 320 KiB.
    assert_eq!(
        2 * c.num_key_value_heads * c.head_dim * 2 * c.num_hidden_layers,
        320 * 1024
    );
}

#[test]
fn mistral_caps_the_context_at_its_window() {
    let c = parse(MISTRAL_7B_V01).unwrap();
    assert_eq!(c.architecture, Architecture::Mistral);
    assert_eq!(c.max_context(), 4096);
}

#[test]
fn qwen2_has_qkv_biases() {
    let c = parse(QWEN2_05B).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.max_context(), 32768);
}

#[test]
fn written_configs_read_back_the_same() {
    for json in [
        LLAMA2_7B,
        LLAMA32_1B,
        LLAMA33_70B,
        MISTRAL_7B_V01,
        QWEN2_05B,
    ] {
        let c = parse(json).unwrap();
        assert_eq!(parse(&c.to_hf_json().to_string()).unwrap(), c);
    }
}

#[test]
fn refusals_say_what_is_wrong() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"architectures":["GPT2LMHeadModel"],"n_embd":768}"#,
            "unsupported architecture \"GPT2LMHeadModel\"",
        ),
        (r#"{"model_type":"gemma"}"#, "unsupported architecture"),
        ("not json", "invalid config"),
        (
            &LLAMA3_8B.replace("\"num_key_value_heads\":8", "\"num_key_value_heads\":5"),
            "not a multiple",
        ),
        (
            &LLAMA3_8B.replace("\"hidden_size\":4096", "\"hidden_size\":0"),
            "hidden_size",
        ),
        (
            &LLAMA3_8B.replace(
                "\"num_hidden_layers\":32",
                "\"num_hidden_layers\":1000000000",
            ),
            "num_hidden_layers",
        ),
        (
            &LLAMA3_8B.replace("\"hidden_act\":\"silu\"", "\"hidden_act\":\"gelu\""),
            "gelu",
        ),
        (
            &LLAMA3_8B.replace(
                "\"rope_scaling\":null",
                "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}",
            ),
            "yarn",
        ),
        (
            &LLAMA3_8B.replace("\"vocab_size\":128256", "\"vocab_size\":\"big\""),
            "vocab_size",
        ),
        (
            &QWEN2_05B.replace(
                "\"use_sliding_window\":false",
                "\"use_sliding_window\":true",
            ),
            "sliding",
        ),
    ];
    for (json, expected) in cases {
        let msg = parse(json).unwrap_err().to_string();
        assert!(
            msg.contains(expected),
            "`{msg}` should mention `{expected}`"
        );
        assert!(
            msg.starts_with("config.json"),
            "`{msg}` should name the file"
        );
    }
}

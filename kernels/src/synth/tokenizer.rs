//! A real byte-level BPE tokenizer for synthetic checkpoints, trained here on a
//! small built-in corpus so that it has genuine merges, multi-byte characters and
//! Llama 3's special tokens, and loads in both `tokenizers` and transformers.

use crate::{Error, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

const CORPUS: &str = include_str!("corpus.txt");

/// Llama 3's special tokens, appended after the learned vocabulary as Llama 3 does.
pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
pub const EOT: &str = "<|eot_id|>";
pub const SPECIALS: [&str; 5] = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT];

/// Llama 3's chat template, for the checkpoint's `tokenizer_config.json`.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

fn err(message: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: "<synthetic>".into(),
        message: message.to_string(),
    }
}

/// Trains a tokenizer with at most `vocab_size` entries (specials included).
pub fn train(vocab_size: usize) -> Result<Tokenizer> {
    let learned = vocab_size.saturating_sub(SPECIALS.len()).max(256);
    let mut builder = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(err)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(learned)
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    builder
        .train(&mut trainer, CORPUS.lines().map(|l| format!("{l}\n")))
        .map_err(err)?;
    let json = serde_json::to_string(&builder).map_err(err)?;
    let mut tokenizer: Tokenizer = json.parse().map_err(err)?;
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    let bos_id = tokenizer
        .token_to_id(BOS)
        .ok_or_else(|| err("BOS was not added"))?;
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(err)?
        .try_pair(format!("{BOS} $A {BOS} $B"))
        .map_err(err)?
        .special_tokens(vec![(BOS.to_string(), bos_id)])
        .build()
        .map_err(err)?;
    tokenizer.with_post_processor(Some(template));
    Ok(tokenizer)
}

/// Writes `tokenizer.json`.
pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    tokenizer.save(path, true).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

//! Chat messages to prompt text with the checkpoint's own Jinja chat template, as
//! Hugging Face's `apply_chat_template` does.

use lime_schemas::ChatMessage;
use std::path::Path;

/// Name of the file holding `chat_template` and the special tokens' text.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// A compiled chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template in `dir/tokenizer_config.json`, or `None` when the checkpoint
    /// has none (plain prompts still work; chats are refused).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let source = match &json["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            // Newer checkpoints list named templates; "default" is the chat one.
            serde_json::Value::Array(list) => match list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
            {
                Some(s) => s.to_owned(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |message: String| -> Result<String, _> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| anyhow::anyhow!("{}: chat_template: {e}", path.display()))?;
        Ok(Some(Self {
            env,
            bos_token: token_text(&json["bos_token"]),
            eos_token: token_text(&json["eos_token"]),
        }))
    }

    /// The prompt for `messages`, ending where the assistant's answer starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, minijinja::Error> {
        self.env.get_template("chat")?.render(minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => true,
        })
    }
}

/// Special tokens appear as a string or as an added-token object.
fn token_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_llama3_style_chat() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>"},
            "chat_template": lime_kernels::synth::tokenizer::CHAT_TEMPLATE,
        });
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        let text = t
            .render(&[ChatMessage {
                role: "user".into(),
                content: " hi ".into(),
            }])
            .unwrap();
        assert_eq!(
            text,
            "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn no_template_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
    }
}

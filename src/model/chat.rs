//! Chat templates: the model's own jinja template (tokenizer_config.json or GGUF
//! `tokenizer.chat_template`) rendered with minijinja, as transformers'
//! `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders it.
//!
//! minijinja with `minijinja-contrib`'s Python-compatibility methods (`.strip()`, `.startswith()`,
//! ...) runs the templates of Llama-3.x, Mistral and SmolLM2; `raise_exception` and
//! `strftime_now` are provided as transformers provides them.
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use crate::model::ModelError;

/// One chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Render `messages` through `template` with the generation prompt appended.
pub fn render(
    template: &str,
    messages: &[Message],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, ModelError> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // transformers passes the current date; kvc renders a fixed date so prompts (and their
        // hashes) are reproducible across days. Llama-3.1's template only shows "%d %b %Y".
        fmt.replace("%d", "26")
            .replace("%b", "Jul")
            .replace("%Y", "2024")
            .replace("%B", "July")
            .replace("%m", "07")
    });
    env.add_template("chat", template).map_err(|e| {
        ModelError::ChatTemplate(format!("the model's chat template does not parse: {e}"))
    })?;
    let tpl = env
        .get_template("chat")
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
    tpl.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| ModelError::ChatTemplate(format!("rendering the chat template failed: {e}")))
}

/// A single user turn (what LongBench and `kvc generate --chat` send).
pub fn user_turn(text: &str) -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: text.to_string(),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm_template_adds_system_turn() {
        let s = render(SMOL, &user_turn("Hi"), None, None).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let e = render(
            "{{ raise_exception('no system role') }}",
            &user_turn("x"),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }

    #[test]
    fn python_string_methods_work() {
        let s = render(
            "{{ messages[0]['content'].strip() }}",
            &user_turn("  x  "),
            None,
            None,
        )
        .unwrap();
        assert_eq!(s, "x");
    }
}

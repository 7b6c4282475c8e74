//! Prompt templates: built-in sets (embedded from `configs/templates/`) or a user file.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Built-in template sets: `(name, description, contents)`.
pub const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "clip",
        "the single CLIP prompt `a photo of a {}.`",
        include_str!("../configs/templates/clip.txt"),
    ),
    (
        "ensemble7",
        "the 7-prompt ImageNet ensemble of Tip-Adapter",
        include_str!("../configs/templates/ensemble7.txt"),
    ),
    (
        "imagenet80",
        "the 80 ImageNet prompts of the CLIP paper",
        include_str!("../configs/templates/imagenet80.txt"),
    ),
];

/// The longest template or class name taken, in characters. CLIP reads 77 tokens of a prompt
/// (a few hundred characters of text); a longer line is not a prompt (a file given by mistake),
/// and tokenizing megabytes of it would take gigabytes of memory.
pub const MAX_PROMPT_CHARS: usize = 1000;

/// `text` as shown in a message: cut after 60 characters.
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Parses template lines: one per line, each with exactly one `{}` for the class name; blank
/// lines and `#` comments are skipped.
pub fn parse(text: &str, origin: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    // Lines end in \n, \r\n or (old Mac files) a lone \r, as in classnames.txt.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let chars = line.chars().count();
        if chars > MAX_PROMPT_CHARS {
            bail!(
                "{origin}:{}: a template of {chars} characters (`{}`); CLIP reads 77 tokens of \
                 a prompt, and clipft takes templates of at most {MAX_PROMPT_CHARS} characters",
                i + 1,
                excerpt(line)
            );
        }
        if let Err(e) = split(line) {
            bail!("{origin}:{}: template `{}` {e}", i + 1, excerpt(line));
        }
        out.push(line.to_string());
    }
    if out.is_empty() {
        bail!("{origin}: no templates");
    }
    Ok(out)
}

/// Resolves `--templates`: a built-in set name, or a file path.
pub fn resolve(spec: &str) -> Result<Vec<String>> {
    if let Some((_, _, text)) = BUILTIN.iter().find(|(n, _, _)| *n == spec) {
        return parse(text, spec);
    }
    let path = Path::new(spec);
    if !path.is_file() {
        let names: Vec<_> = BUILTIN.iter().map(|(n, _, _)| *n).collect();
        bail!(
            "--templates {spec}: neither a file nor a built-in set ({})",
            names.join(", ")
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // A byte-order mark (Windows editors) is not part of the first template.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    parse(text, &path.display().to_string())
}

/// The file a `--templates` value reads, if it names one (not a built-in set): an input that
/// no output may overwrite.
pub fn file(spec: &str) -> Option<&Path> {
    let builtin = BUILTIN.iter().any(|(n, _, _)| *n == spec);
    (!builtin).then(|| Path::new(spec)).filter(|p| p.is_file())
}

/// `template` with the class name filled in.
pub fn fill(template: &str, class: &str) -> String {
    match split(template) {
        Ok((before, after)) => format!("{before}{class}{after}"),
        // (Templates are checked when read; an unchecked one is filled as it reads.)
        Err(_) => template.replacen("{}", class, 1),
    }
}

/// Checks a template as Python's `template.format(classname)` reads it (the reference
/// repositories fill their templates so): exactly one `{}` (or `{0}`), and `{{` / `}}` for
/// literal braces.
pub fn check(template: &str) -> Result<(), String> {
    split(template).map(drop)
}

/// The text before and after a template's `{}` (or `{0}`), its `{{` and `}}` unescaped.
fn split(template: &str) -> Result<(String, String), String> {
    let (mut parts, mut current) = (Vec::new(), String::new());
    let chars: Vec<char> = template.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let (c, next) = (chars[i], chars.get(i + 1).copied());
        i += match (c, next) {
            ('{', Some('{')) | ('}', Some('}')) => {
                current.push(c);
                2
            }
            ('{', Some('}')) => {
                parts.push(std::mem::take(&mut current));
                2
            }
            // `{0}`: Python's numbered form of the one argument.
            ('{', Some('0')) if chars.get(i + 2) == Some(&'}') => {
                parts.push(std::mem::take(&mut current));
                3
            }
            ('{' | '}', _) => {
                return Err(format!(
                    "has a lone `{c}`: the class name goes in `{{}}`, and a brace of the prompt \
                     is written twice (`{{{{`, `}}}}`)"
                ))
            }
            _ => {
                current.push(c);
                1
            }
        };
    }
    match parts.len() {
        1 => Ok((parts.remove(0), current)),
        _ => Err("must contain `{}` exactly once".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_have_expected_sizes() {
        assert_eq!(resolve("clip").unwrap(), vec!["a photo of a {}."]);
        assert_eq!(resolve("ensemble7").unwrap().len(), 7);
        assert_eq!(resolve("imagenet80").unwrap().len(), 80);
    }

    #[test]
    fn bad_templates_are_rejected_with_line() {
        let err = parse("a {}\nno placeholder\n", "t.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.txt:2"), "{err}");
        assert!(parse("# only a comment\n", "t.txt").is_err());
        assert!(resolve("no-such-set")
            .unwrap_err()
            .to_string()
            .contains("ensemble7"));
        assert_eq!(fill("a photo of a {}.", "dog"), "a photo of a dog.");
        // As Python's str.format: doubled braces are literal ones.
        assert_eq!(fill("a {{{}}} photo", "dog"), "a {dog} photo");
        assert_eq!(fill("{{}} {}", "dog"), "{} dog");
        assert!(check("a photo of a {{}}.").is_err());
        assert_eq!(fill("a {0} photo", "dog"), "a dog photo");
        assert!(check("a {1} photo").is_err());
        assert!(check("a {} photo {x}").unwrap_err().contains("lone `{`"));
        assert!(check("a {} photo }").is_err());
        assert!(check("{}{}").is_err());
        // A line far longer than any prompt (a file given by mistake) is refused, shown cut.
        let long = format!("a {{}} {}\n", "x".repeat(MAX_PROMPT_CHARS));
        let err = parse(&long, "t.txt").unwrap_err().to_string();
        assert!(
            err.contains("t.txt:1: a template of 1005 characters")
                && err.contains("xxx…`")
                && err.len() < 300,
            "{err}"
        );
        let fits = format!("a {{}} {}", "x".repeat(MAX_PROMPT_CHARS - 5));
        assert_eq!(parse(&fits, "t.txt").unwrap(), [fits]);
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_template() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, "\u{feff}a photo of a {}.\r\nart of a {}.\n").unwrap();
        assert_eq!(
            resolve(p.to_str().unwrap()).unwrap(),
            vec!["a photo of a {}.", "art of a {}."]
        );
        // Old Mac line ends, blank lines and comments.
        std::fs::write(&p, "a photo of a {}.\r\r# mine\rart of a {}.\r").unwrap();
        assert_eq!(
            resolve(p.to_str().unwrap()).unwrap(),
            vec!["a photo of a {}.", "art of a {}."]
        );
    }
}

//! The command that picks a stopped run up again: the one it was started with, `--resume` set to
//! the checkpoint it wrote.

use std::ffi::OsString;
use std::path::Path;

/// `args` (the program and its arguments, as the run was started) with any `--resume` replaced
/// by `--resume <checkpoint>`, quoted for a POSIX shell.
pub fn resume_command(args: impl IntoIterator<Item = OsString>, checkpoint: &Path) -> String {
    let mut words = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        if text == "--resume" {
            args.next();
        } else if !text.starts_with("--resume=") {
            words.push(quoted(&text));
        }
    }
    words.push("--resume".into());
    words.push(quoted(&checkpoint.to_string_lossy()));
    words.join(" ")
}

/// `word` as the shell reads it back: as is when it holds no special character, else in single
/// quotes (a quote inside written as `'\''`).
fn quoted(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str], checkpoint: &str) -> String {
        resume_command(args.iter().map(OsString::from), Path::new(checkpoint))
    }

    #[test]
    fn resume_is_added_or_replaced_and_odd_words_quoted() {
        assert_eq!(
            command(&["ranger-tune", "train", "--model", "m", "--output", "out"], "out/checkpoint-7"),
            "ranger-tune train --model m --output out --resume out/checkpoint-7"
        );
        assert_eq!(
            command(&["rt", "train", "--resume", "out/checkpoint-3", "--resume=x", "--seed", "1"], "out/checkpoint-9"),
            "rt train --seed 1 --resume out/checkpoint-9"
        );
        assert_eq!(
            command(&["rt", "train", "--data", "my data's.jsonl", "--labels", ""], "a b/checkpoint-1"),
            r"rt train --data 'my data'\''s.jsonl' --labels '' --resume 'a b/checkpoint-1'"
        );
    }
}

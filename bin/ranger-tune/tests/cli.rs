//! The `ranger-tune` binary: help, TOML config with flag overrides, a full run on a tiny model,
//! generate on its output, the documented error for a corrupted data line, a classifier
//! trained, merged and used by `predict`, real signals (Ctrl-C, SIGTERM and SIGHUP stop after a
//! checkpoint with exit 75 and the printed command resumes bit for bit; a second signal exits at
//! once with 130, leaving a checkpoint that resumes), and the guards of long runs: one run per
//! output folder, and a full disk; the learning rate and beta2 chosen for a run when unset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ranger-tune"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running ranger-tune")
}

/// `run`, asserting that the command succeeded (its output shown otherwise).
fn run_ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// `predict --model <model> <args> --device cpu`.
fn predict(model: &Path, args: &[&str]) -> Output {
    run(&[&["predict", "--model", p(model)][..], args, &["--device", "cpu"]].concat())
}

/// `train` on the tiny model and data of a `workdir`, writing to its `out/`.
fn train_in(d: &Path) -> Command {
    train_into(d, &d.join("out"))
}

/// `train` on the tiny model and data of a `workdir`, writing to `out`.
fn train_into(d: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("train").arg("--model").arg(d.join("model")).arg("--data").arg(d.join("train.jsonl"));
    c.arg("--output").arg(out);
    c
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ranger-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    ranger_train::testing::write_tiny_model(&d.join("model"), &ranger_train::testing::tiny_config("llama"), 3).unwrap();
    let mut data = String::new();
    for w in ["red", "blue", "green", "red", "blue", "green", "red", "blue"] {
        data.push_str(&format!("{{\"prompt\": \"what color is the sky ?\", \"completion\": \" the sky is {w} .\"}}\n"));
    }
    std::fs::write(d.join("train.jsonl"), data).unwrap();
    d
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn help_documents_every_flag() {
    let o = run(&["train", "--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for flag in [
        "--model",
        "--data",
        "--validation-file",
        "--val-split",
        "--optimizer",
        "--learning-rate",
        "--lr-scheduler",
        "--warmup-steps",
        "--grad-accumulation-steps",
        "--max-grad-norm",
        "--eval-every",
        "--save-every",
        "--save-total-limit",
        "--early-stopping-patience",
        "--resume",
        "--device",
        "--dtype",
        "--on-nan",
        "--eval-weights",
        "--pack",
        "--no-mask-prompt",
        "--chat-template",
        "--config",
        "--lora",
        "--lora-rank",
        "--lora-alpha",
        "--lora-targets",
        "--lora-adapter",
        "--task",
        "--text-column",
        "--text-pair-column",
        "--label-column",
        "--labels",
        "--metric-for-best",
        "--lora-dropout",
        "--dora",
        "--rslora",
        "--modules-to-save",
    ] {
        assert!(t.contains(flag), "train --help lacks {flag}");
    }
    for command in ["generate", "eval", "merge"] {
        assert!(
            text(&run_ok(&[command, "--help"])).contains("--chat-template"),
            "{command} --help lacks --chat-template"
        );
    }
    assert!(run(&["convert", "--help"]).status.success());
    assert!(run(&["merge", "--help"]).status.success());
    assert!(run(&["predict", "--help"]).status.success());
    let t = text(&run_ok(&["eval", "--help"]));
    for flag in ["--model", "--adapter", "--data", "--max-seq-length", "--no-mask-prompt", "--batch-size", "--json"] {
        assert!(t.contains(flag), "eval --help lacks {flag}");
    }
}

/// `generate --chat` on a model without a chat template is refused naming `--chat-template`;
/// with a template file it answers.
#[test]
fn generate_chat_takes_a_template_file_for_a_model_without_one() {
    let d = workdir("chat-template");
    let template = ranger_train::testing::take_chat_template(&d.join("model"));
    let model = d.join("model");
    let args = ["generate", "--model", p(&model), "--chat", "--prompt", "sky", "--max-tokens", "3"];
    let o = run(&[&args[..], &["--device", "cpu"]].concat());
    assert!(!o.status.success() && text(&o).contains("--chat-template"), "{}", text(&o));
    let file = d.join("chat.jinja");
    std::fs::write(&file, template.as_str().unwrap()).unwrap();
    run_ok(&[&args[..], &["--device", "cpu", "--chat-template", p(&file)]].concat());
    // A LoRA run trained with the template saves it with the adapter, where `generate` and
    // `merge` find it for the model that lacks one.
    let out = d.join("lora");
    let o = train_into(&d, &out).args(["--lora", "--max-steps", "1", "--chat-template", p(&file)]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let adapter = out.join("adapter");
    run_ok(&[&args[..], &["--device", "cpu", "--adapter", p(&adapter)]].concat());
    let merged = d.join("merged");
    run_ok(&["merge", "--model", p(&model), "--adapter", p(&adapter), "--output", p(&merged)]);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(saved["chat_template"], template, "the merged folder carries the adapter's template");
}

/// `merge --gguf` on a GGUF base (llama.cpp's converter wrote the fixture): the file lands in the
/// output folder (or at `--gguf-path`), and `eval` scores it as it scores the merged folder, to
/// within Q8_0's rounding; a base that is not a GGUF file, and `--gguf-path` alone, are refused.
#[test]
fn merge_writes_a_gguf_file_from_a_gguf_base() {
    let d = workdir("merge-gguf");
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/llama.gguf");
    let data = d.join("train.jsonl");
    let run_dir = d.join("lora");
    run_ok(&["train", "--model", p(&gguf), "--data", p(&data), "--output", p(&run_dir), "--lora", "--max-steps", "3"]);
    let adapter = run_dir.join("adapter");
    let merged = d.join("merged");
    let merge = ["merge", "--model", p(&gguf), "--adapter", p(&adapter), "--output", p(&merged)];
    let o = run_ok(&[&merge[..], &["--gguf", "q8_0"]].concat());
    let file = merged.join("model-q8_0.gguf");
    assert!(file.is_file() && text(&o).contains("model-q8_0.gguf (GGUF"), "{}", text(&o));
    let (folder, from_gguf) = (eval_loss(&merged, &data, &[]), eval_loss(&file, &data, &[]));
    let (a, b) = (folder["loss"].as_f64().unwrap(), from_gguf["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 0.02 * a && a != b, "merged folder {a}, its Q8_0 GGUF file {b}");
    let elsewhere = d.join("elsewhere/merged.gguf");
    run_ok(&[&merge[..], &["--gguf", "f32", "--gguf-path", p(&elsewhere)]].concat());
    assert!((eval_loss(&elsewhere, &data, &[])["loss"].as_f64().unwrap() - a).abs() < 1e-5);
    let o = run(&[
        "merge",
        "--model",
        p(&d.join("model")),
        "--adapter",
        p(&adapter),
        "--output",
        p(&merged),
        "--gguf",
        "q4_k",
    ]);
    assert!(!o.status.success() && text(&o).contains("--gguf needs the base as a .gguf file"), "{}", text(&o));
    let o = run(&[&merge[..], &["--gguf-path", p(&elsewhere)]].concat());
    assert!(!o.status.success() && text(&o).contains("--gguf"), "{}", text(&o));
}

/// `eval --json` on `model` (with `extra` flags): the reported loss.
fn eval_loss(model: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let args = [&["eval", "--model", p(model), "--data", p(data), "--device", "cpu", "--json"][..], extra].concat();
    serde_json::from_slice(&run_ok(&args).stdout).unwrap()
}

#[test]
fn eval_scores_a_saved_model_or_adapter_as_the_run_did() {
    let d = workdir("eval");
    let data = d.join("train.jsonl");
    let base = eval_loss(&d.join("model"), &data, &[]);
    // 8 examples of " the sky is <colour> ." after the prompt: 5 target tokens each at most.
    assert_eq!(base["examples"], 8);
    assert!(base["target_tokens"].as_u64().unwrap() >= 8, "{base}");
    let ppl = base["perplexity"].as_f64().unwrap();
    assert!((ppl - base["loss"].as_f64().unwrap().exp()).abs() < 1e-9 * ppl);
    for (name, extra) in [("full", &[][..]), ("lora", &["--lora", "--learning-rate", "0.01"][..])] {
        let out = d.join(name);
        let mut c = train_into(&d, &out);
        c.args(["--validation-file", p(&data), "--max-steps", "6", "--batch-size", "2", "--device", "cpu", "--json"]);
        let o = c.args(extra).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let run_loss = summary["eval_loss"].as_f64().unwrap();
        // The saved model (or base + adapter), scored afresh, gives the run's last evaluation.
        let scored = match name {
            "full" => eval_loss(&out.join("model"), &data, &["--batch-size", "2"]),
            _ => eval_loss(&d.join("model"), &data, &["--adapter", p(&out.join("adapter")), "--batch-size", "2"]),
        };
        let loss = scored["loss"].as_f64().unwrap();
        assert!((loss - run_loss).abs() <= 1e-6 * run_loss, "{name}: eval {loss} against the run's {run_loss}");
        assert!(loss < base["loss"].as_f64().unwrap(), "{name}: training did not lower the loss");
        if name == "full" {
            // Another batch size pads differently: the same loss to rounding.
            let other = eval_loss(&out.join("model"), &data, &["--batch-size", "3"])["loss"].as_f64().unwrap();
            assert!((other - loss).abs() <= 1e-5 * loss, "batch 3: {other} against {loss}");
        }
    }
    // Scoring the prompts too covers more tokens.
    let all = eval_loss(&d.join("model"), &data, &["--no-mask-prompt"]);
    assert!(all["target_tokens"].as_u64() > base["target_tokens"].as_u64(), "{all} {base}");
    // A missing file is named.
    let o = run(&["eval", "--model", p(&d.join("model")), "--data", p(&d.join("nope.jsonl")), "--device", "cpu"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("nope.jsonl"), "{}", text(&o));
    // An encoder is pointed at `predict`.
    let enc = d.join("encoder");
    ranger_train::testing::write_tiny_encoder(&enc, &ranger_train::testing::tiny_encoder_config("bert"), 1).unwrap();
    let o = run(&["eval", "--model", p(&enc), "--data", p(&data), "--device", "cpu"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("predict --label-column"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn classifier_trains_then_predict_writes_labels_and_scores() {
    let d = std::env::temp_dir().join(format!("ranger-cli-classify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let cfg = ranger_train::testing::tiny_encoder_config("bert");
    ranger_train::testing::write_tiny_encoder(&d.join("model"), &cfg, 3).unwrap();
    let mut csv = String::from("text,label\n");
    for i in 0..24 {
        let (w, l) = [("red", "warm"), ("blue", "cool"), ("green", "cool")][i % 3];
        csv.push_str(&format!("\"the cat is {w} .\",{l}\n"));
    }
    std::fs::write(d.join("train.csv"), &csv).unwrap();
    std::fs::write(d.join("new.jsonl"), "{\"text\": \"the dog is red .\", \"label\": \"warm\"}\n{\"text\": \"the sky is blue .\", \"label\": \"cool\"}\n").unwrap();
    let (model, train) = (d.join("model"), d.join("train.csv"));
    let common = [
        "--task",
        "classify",
        "--model",
        p(&model),
        "--data",
        p(&train),
        "--val-split",
        "0.25",
        "--max-steps",
        "96",
        "--batch-size",
        "6",
        "--learning-rate",
        "0.03",
        "--beta2",
        "0.99",
        "--eps",
        "1e-8",
        "--device",
        "cpu",
        "--eval-every",
        "24",
        "--metric-for-best",
        "accuracy",
    ];
    let t = text(&run_ok(&[&["train", "--output", p(&d.join("out"))][..], &common[..]].concat()));
    assert!(t.contains("eval accuracy") && t.contains("best model"), "{t}");
    let (preds, new) = (d.join("preds.jsonl"), d.join("new.jsonl"));
    let o = predict(&d.join("out/best"), &["--data", p(&new), "--label-column", "label", "--output", p(&preds)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("accuracy"), "{}", text(&o));
    let lines = read_jsonl(&preds);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[0]["label"], "warm", "{lines:?}");
    assert_eq!(lines[1]["label"], "cool", "{lines:?}");
    let total: f64 = lines[0]["scores"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-5);
    // DoRA with dropout (--dora implies --lora): the adapter merges into a full classifier that
    // predicts the same.
    run_ok(
        &[
            &["train", "--output", p(&d.join("lora")), "--dora", "--lora-dropout", "0.1", "--lora-rank", "4"][..],
            &common[..],
        ]
        .concat(),
    );
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("lora/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (ac["use_dora"].as_bool(), ac["lora_dropout"].as_f64(), ac["r"].as_u64()),
        (Some(true), Some(0.1), Some(4))
    );
    let adapter = d.join("lora/adapter");
    let via_adapter = d.join("via-adapter.jsonl");
    let o = predict(&model, &["--adapter", p(&adapter), "--data", p(&new), "--output", p(&via_adapter)]);
    assert!(o.status.success(), "{}", text(&o));
    run_ok(&["merge", "--model", p(&model), "--adapter", p(&adapter), "--output", p(&d.join("merged"))]);
    let via_merged = d.join("via-merged.jsonl");
    let o = predict(&d.join("merged"), &["--data", p(&new), "--output", p(&via_merged)]);
    assert!(o.status.success(), "{}", text(&o));
    let scores = |path: &Path| -> Vec<f64> {
        read_jsonl(path)
            .iter()
            .flat_map(|v| v["scores"].as_object().unwrap().values().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>())
            .collect()
    };
    for (a, b) in scores(&via_adapter).iter().zip(scores(&via_merged)) {
        assert!((a - b).abs() < 1e-5, "adapter {a} vs merged {b}");
    }
    // A model without a trained head is refused by predict, naming the tensor.
    let o = predict(&model, &["--data", p(&new)]);
    assert!(!o.status.success());
    assert!(text(&o).contains("id2label") || text(&o).contains("classifier"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn config_file_flags_override_and_a_run_completes() {
    let d = workdir("run");
    let toml = format!(
        "model = \"{}\"\ndata = \"{}\"\noutput = \"{}\"\nmax_steps = 50\nbatch_size = 2\nlearning_rate = 0.01\nval_split = 0.25\ndevice = \"cpu\"\n",
        p(&d.join("model")),
        p(&d.join("train.jsonl")),
        p(&d.join("out"))
    );
    std::fs::write(d.join("run.toml"), toml).unwrap();
    // The file says 50 steps; the flag wins.
    let o = run_ok(&["train", "--config", p(&d.join("run.toml")), "--max-steps", "3", "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"], 3);
    assert_eq!(summary["weights"], "slow");
    assert!(summary["eval_loss"].as_f64().unwrap().is_finite());
    let model = d.join("out/model");
    assert!(model.join("model.safetensors").exists());
    run_ok(&[
        "generate",
        "--model",
        p(&model),
        "--prompt",
        "what color is the sky ?",
        "--max-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    // Unknown keys in the file are rejected with the file named.
    std::fs::write(d.join("bad.toml"), "learning_rat = 0.1\n").unwrap();
    let o = run(&["train", "--config", p(&d.join("bad.toml"))]);
    assert!(!o.status.success());
    assert!(text(&o).contains("bad.toml"), "{}", text(&o));
}

#[test]
fn unset_learning_rate_and_betas_are_chosen_for_the_run_said_and_resumed() {
    use ranger_train::config::{default_beta1, default_beta2, default_learning_rate, OptimizerKind, TaskKind};
    let d = workdir("defaults");
    let o = train_in(&d).args(["--max-steps", "40", "--batch-size", "2", "--device", "cpu"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let (lr, beta2) = (
        default_learning_rate(OptimizerKind::Ranger, TaskKind::CausalLm, false, 40),
        default_beta2(OptimizerKind::Ranger, 40),
    );
    assert!(
        text(&o).contains(&format!("learning rate {lr:e}: the default for ranger, full fine-tune, raised 2.50x")),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains(&format!("beta2 {beta2}: RAdam's warmup")), "{}", text(&o));
    let beta1 = default_beta1(OptimizerKind::Ranger, TaskKind::CausalLm);
    assert!(text(&o).contains(&format!("beta1 {beta1}: the default for ranger (the published")), "{}", text(&o));
    // The checkpoint records the values used, and the same command resumes from it.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/checkpoint-40/trainer_state.json")).unwrap())
            .unwrap();
    let config = &state["config"];
    assert_eq!(
        (config["learning_rate"].as_f64(), config["beta1"].as_f64(), config["beta2"].as_f64()),
        (Some(lr), Some(beta1), Some(beta2))
    );
    let o = train_in(&d)
        .args([
            "--max-steps",
            "40",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--resume",
            p(&d.join("out/checkpoint-40")),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // A given value is kept and not announced; AdamW keeps torch's beta2.
    let o = train_into(&d, &d.join("adamw"))
        .args(["--max-steps", "2", "--device", "cpu", "--optimizer", "adamw", "--learning-rate", "0.01"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(["learning rate", "beta1", "beta2"].iter().all(|w| !text(&o).contains(w)), "{}", text(&o));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adamw/checkpoint-2/trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(
        (state["config"]["learning_rate"].as_f64(), state["config"]["beta2"].as_f64()),
        (Some(0.01), Some(0.999))
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn corrupted_line_is_reported_with_file_and_line() {
    let d = workdir("corrupt");
    let mut lines: Vec<String> =
        std::fs::read_to_string(d.join("train.jsonl")).unwrap().lines().map(String::from).collect();
    lines[4] = "{\"prompt\": \"what color".into();
    std::fs::write(d.join("train.jsonl"), lines.join("\n")).unwrap();
    let o = train_in(&d).args(["--device", "cpu"]).output().expect("running ranger-tune");
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("train.jsonl:5: invalid JSON"), "{t}");
    assert!(!d.join("out/model").exists());
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_cleanly() {
    let d = workdir("sigint");
    let child = train_in(&d)
        .args(["--max-steps", "1000000", "--batch-size", "2", "--device", "cpu"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (the output folder appears when it starts), then
    // interrupt as a terminal's Ctrl-C would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !d.join("out").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    // Stopped by a signal, checkpoint written: the documented status, neither success nor error.
    assert_eq!(o.status.code(), Some(75), "{t}");
    assert!(t.contains("interrupted") && t.contains("resume with --resume"), "{t}");
    let ckpt: Vec<_> = std::fs::read_dir(d.join("out"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpt.len(), 1, "one checkpoint written on Ctrl-C");
    assert!(ckpt[0].path().join("optimizer.safetensors").exists());
    assert!(!d.join("out/model").exists(), "an interrupted run writes no final model");
}

/// Steps before a signal is sent, half of the signal tests' run: a tiny model's step takes about
/// a millisecond, so the run cannot end between the test seeing step `HALF` in `metrics.jsonl`
/// and the signal arriving.
const HALF: usize = 2000;

/// The training options of the signal tests (the tiny model, `2 * HALF` steps).
fn signal_args() -> Vec<String> {
    let steps = (2 * HALF).to_string();
    ["--max-steps", &steps, "--batch-size", "2", "--learning-rate", "0.01", "--log-every", "100", "--device", "cpu"]
        .map(String::from)
        .to_vec()
}

/// The output folder of the straight run every signal test compares with (run once).
fn straight_run() -> &'static Path {
    static OUT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    OUT.get_or_init(|| {
        let d = workdir("straight");
        let o = train_in(&d).args(signal_args()).output().expect("running ranger-tune");
        assert!(o.status.success(), "{}", text(&o));
        d.join("out")
    })
}

/// Starts the signal tests' run into `d/out`, its stdout and stderr going to `d/log.txt` (a
/// pipe nobody reads could fill and block it).
fn spawn_run(d: &Path, extra: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(d.join("log.txt")).unwrap();
    train_in(d).args(signal_args()).args(extra).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
}

/// The steps of the lines of a `metrics.jsonl` (a line still being written is left out).
fn metric_steps(path: &Path) -> Vec<usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .map(|s| s as usize)
        .collect()
}

/// The step of the last complete line of a `metrics.jsonl`.
fn last_step(path: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .map(|s| s as usize)
}

/// Waits until the run in `d/out` has written the metrics of step `n` (polling its
/// `metrics.jsonl`, for up to 10 minutes on a loaded machine).
fn wait_for_step(child: &mut std::process::Child, d: &Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while last_step(&d.join("out/metrics.jsonl")) < Some(n) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited ({status}) before step {n}: {}", std::fs::read_to_string(d.join("log.txt")).unwrap());
        }
        assert!(std::time::Instant::now() < deadline, "step {n} not reached in 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits (up to 10 minutes) for the run to exit; its status and output.
fn wait_exit(mut child: std::process::Child, d: &Path) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 10 minutes after the signal");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(d.join("log.txt")).unwrap())
}

/// Sends `signal` (a name such as `TERM`) to process `pid`.
fn kill(signal: &str, pid: u32) {
    let status = Command::new("kill").args([format!("-{signal}"), pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The step numbers and folders of the complete checkpoints (those with a
/// `trainer_state.json`, which a resume considers) in `out`, in step order.
fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").exists().then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// A safetensors file as its header (tensor names, shapes, offsets and metadata, in any order:
/// the optimizer state's metadata comes from a hash map) and its tensor bytes.
fn safetensors_parts(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..n]).unwrap(), bytes[n..].to_vec())
}

/// Checks that the run in `out` ended as the straight run did, bit for bit: the model, the last
/// checkpoint's weights and optimizer state, and `metrics.jsonl` (one line per step, in order,
/// with the same figures: only the speed and memory ones may differ).
fn assert_same_as_straight(out: &Path) {
    let straight = straight_run();
    let last = format!("checkpoint-{}", 2 * HALF);
    for f in ["model/model.safetensors", &format!("{last}/model.safetensors"), &format!("{last}/optimizer.safetensors")]
    {
        assert!(safetensors_parts(&out.join(f)) == safetensors_parts(&straight.join(f)), "{f} differs");
    }
    let steps = metric_steps(&out.join("metrics.jsonl"));
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps not strictly increasing: {steps:?}");
    let lines = |dir: &Path| -> Vec<String> {
        ranger_train::trainer::report::MetricsFile::read(&dir.join("metrics.jsonl"))
            .iter()
            .map(|r| serde_json::to_string(&r.without_timings()).unwrap())
            .collect()
    };
    let (ours, theirs) = (lines(out), lines(straight));
    assert_eq!(ours.len(), 2 * HALF);
    assert!(ours == theirs, "metrics.jsonl differs from the straight run's");
}

/// SIGTERM (or SIGHUP) once step HALF is done: the run finishes its step, writes a checkpoint
/// and its metrics, prints the command that resumes it and exits with 75; that command ends the
/// run exactly as a straight one.
fn signal_stops_after_a_checkpoint_and_the_printed_command_resumes_exactly(signal: &str) {
    let d = workdir(&format!("sig{signal}"));
    let out = d.join("out");
    let mut child = spawn_run(&d, &[]);
    wait_for_step(&mut child, &d, HALF);
    kill(signal, child.id());
    let (status, log) = wait_exit(child, &d);
    assert_eq!(status.code(), Some(75), "{log}");
    let saved = checkpoints(&out);
    assert_eq!(saved.len(), 1, "one checkpoint, written on the signal: {saved:?}\n{log}");
    let (at, checkpoint) = &saved[0];
    assert!((HALF..=2 * HALF).contains(at), "checkpoint of step {at}");
    assert!(checkpoint.join("optimizer.safetensors").exists() && checkpoint.join("model.safetensors").exists());
    assert!(!out.join("model").exists(), "a stopped run writes no final model");
    assert_eq!(last_step(&out.join("metrics.jsonl")), Some(*at), "metrics up to the checkpoint");
    let command = log
        .lines()
        .skip_while(|l| !l.starts_with(&format!("stopped at step {at} of {}", 2 * HALF)))
        .nth(1)
        .unwrap_or_else(|| panic!("no resume command printed: {log}"))
        .trim();
    assert!(command.ends_with(&format!("--resume {}", checkpoint.display())), "{command}");
    let o = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(o.status.success(), "{command}: {}", text(&o));
    assert!(text(&o).contains(&format!("resumed from {}", checkpoint.display())), "{}", text(&o));
    assert_same_as_straight(&out);
}

#[test]
fn sigterm_stops_after_a_checkpoint_and_the_printed_command_resumes_exactly() {
    signal_stops_after_a_checkpoint_and_the_printed_command_resumes_exactly("TERM");
}

#[test]
fn sighup_stops_after_a_checkpoint_and_the_printed_command_resumes_exactly() {
    signal_stops_after_a_checkpoint_and_the_printed_command_resumes_exactly("HUP");
}

/// A second signal exits at once (130) with no checkpoint written after it, and whatever was
/// being written when it came (a checkpoint every step here, so most likely one), the latest
/// complete checkpoint resumes to the straight run's end.
#[test]
fn a_second_signal_exits_at_once_and_the_latest_checkpoint_still_resumes_exactly() {
    let d = workdir("sig-twice");
    let out = d.join("out");
    // Writing a checkpoint every step, the run takes far longer than HALF steps to end.
    let mut child = spawn_run(&d, &["--save-every", "1"]);
    wait_for_step(&mut child, &d, 50);
    // Stopped, the run gets both signals before it can act on the first (two of one kind would
    // merge into one pending signal, so two kinds): the second finds the stop already asked for.
    let pid = child.id();
    for signal in ["STOP", "TERM", "HUP", "CONT"] {
        kill(signal, pid);
    }
    let (status, log) = wait_exit(child, &d);
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(!log.contains("stopped at step"), "{log}");
    let saved = checkpoints(&out);
    assert!(!saved.is_empty(), "{log}");
    for (_, dir) in &saved {
        for f in ["model.safetensors", "optimizer.safetensors"] {
            assert!(dir.join(f).exists(), "{} lacks {f}", dir.display());
        }
    }
    // The rest without a checkpoint every step (a resume may change --save-every).
    let o = train_in(&d).args(signal_args()).args(["--resume", p(&out)]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let latest = saved.last().unwrap().1.display().to_string();
    assert!(text(&o).contains(&format!("resumed from {latest}")), "{}", text(&o));
    assert_same_as_straight(&out);
}

/// Waits (up to a minute) until `path` exists and its text contains `what`.
fn wait_for_text(path: &Path, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(path).is_ok_and(|t| t.contains(what)) {
        assert!(std::time::Instant::now() < deadline, "{} never held {what:?}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Two runs into one output folder: the second fails at once (before loading its model), naming
/// the first; once the first dies without releasing its lock (SIGKILL), the next run takes the
/// stale lock over with a note, and removes the lock when it ends.
#[test]
fn a_busy_output_is_refused_and_a_dead_runs_lock_is_taken_over() {
    let d = workdir("lock");
    let mut first = train_in(&d)
        .args(["--max-steps", "1000000", "--batch-size", "2", "--device", "cpu"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = d.join("out/.ranger-tune.lock");
    wait_for_text(&lock, &format!("\"pid\":{}", first.id()));
    let o = train_in(&d).args(["--max-steps", "2", "--device", "cpu"]).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("another run is using this output folder"), "{t}");
    assert!(t.contains(&format!("pid {} on host ", first.id())) && t.contains(" since 20"), "{t}");
    assert!(!t.contains("trainable parameters"), "refused before loading the model: {t}");
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    // SIGKILL: no handler runs, the lock file stays; the OS lock goes with the process.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(lock.exists());
    let o = train_in(&d).args(["--max-steps", "2", "--device", "cpu"]).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("took over the stale lock") && t.contains(&format!("pid {} on host ", first.id())), "{t}");
    assert!(!lock.exists(), "the lock is released at the end of the run");
    assert!(d.join("out/model/model.safetensors").exists());
}

/// The bytes a file takes on a tmpfs (whole 4 KiB pages).
fn pages(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len().div_ceil(4096) * 4096)
}

/// A safetensors file's header (as JSON: its metadata map is written in no fixed order) and data.
fn safetensors_content(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..end]).unwrap(), bytes[end..].to_vec())
}

/// Names under `dir` (recursively) that only a write in progress has.
fn debris(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".partial-") || name.contains(".old-") || name.contains(".tmp") {
            out.push(e.path());
        } else if e.path().is_dir() {
            out.extend(debris(&e.path()));
        }
    }
    out
}

/// A full disk: the checkpoint that does not fit leaves no partial files, the error names the
/// file, the space needed and the ways out, and the last good checkpoint is intact and resumes
/// exactly. The disk is a small tmpfs where mounting one is allowed (root); elsewhere the
/// process's file size limit (`ulimit -f`) makes the same checkpoint write fail.
#[test]
fn a_full_disk_leaves_no_partial_checkpoint_and_the_last_one_resumes() {
    let d = workdir("full-disk");
    let args = ["--max-steps", "2", "--save-every", "1", "--batch-size", "2", "--device", "cpu"];
    let reference = d.join("ref");
    let o = train_into(&d, &reference).args(args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ckpt_files = ["model.safetensors", "optimizer.safetensors", "trainer_state.json"];
    let ckpt_pages: u64 = ckpt_files.iter().map(|f| pages(&reference.join("checkpoint-1").join(f))).sum();
    let small = pages(&reference.join("metrics.jsonl")) + pages(&reference.join("loss_curve.svg"));
    // Room for the first checkpoint, the small files (twice: they are rewritten) and 16 pages.
    let budget = ckpt_pages + 2 * small + 16 * 4096;
    assert!(budget < 2 * ckpt_pages, "the second checkpoint must not fit");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let disk = d.join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let size = format!("size={}k", budget / 1024);
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &size, "tmpfs", p(&disk)])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _unmount = mounted.then(|| Unmount(disk.clone()));
    let out = disk.join("out");
    let o = if mounted {
        train_into(&d, &out).args(args).output().unwrap()
    } else {
        // No mount allowed: step 1's checkpoint is put in place, and the resumed run may write
        // no file larger than half the weights, so checkpoint-2's first file fails (EFBIG).
        eprintln!("cannot mount a tmpfs here: limiting the file size instead");
        let ckpt1 = out.join("checkpoint-1");
        std::fs::create_dir_all(&ckpt1).unwrap();
        for f in ckpt_files {
            std::fs::copy(reference.join("checkpoint-1").join(f), ckpt1.join(f)).unwrap();
        }
        let weights = std::fs::metadata(reference.join("checkpoint-1/model.safetensors")).unwrap().len();
        let limit_kib = (weights / 2).max(small + 4096) / 1024;
        assert!(limit_kib * 1024 < weights, "the limit must stop the weights");
        let mut c = Command::new("bash");
        c.args(["-c", &format!("trap '' XFSZ; ulimit -f {limit_kib}; exec \"$0\" \"$@\"")]);
        c.arg(env!("CARGO_BIN_EXE_ranger-tune")).args(train_into(&d, &out).get_args()).args(args);
        c.arg("--resume").arg(&out).output().unwrap()
    };
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("checkpoint-2: cannot write it (it needs about"), "{t}");
    assert!(t.contains("model.safetensors") || t.contains("optimizer.safetensors"), "names the file: {t}");
    assert!(t.contains("--save-total-limit") && t.contains("another --output"), "{t}");
    // The bytes needed: what checkpoint-2 takes on the roomy disk, give or take its headers.
    let needed: u64 = t.split(" bytes)").next().unwrap().rsplit('(').next().unwrap().parse().unwrap();
    let written: u64 =
        ckpt_files.iter().map(|f| std::fs::metadata(reference.join("checkpoint-2").join(f)).unwrap().len()).sum();
    assert!(needed * 10 >= written * 9 && needed <= written, "needs {needed} bytes, checkpoint-2 takes {written}");
    assert_eq!(debris(&out), Vec::<PathBuf>::new(), "partial files left: {t}");
    assert!(!out.join("checkpoint-2").exists());
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (kept, good) = (out.join("checkpoint-1").join(f), reference.join("checkpoint-1").join(f));
        assert!(safetensors_content(&kept) == safetensors_content(&good), "checkpoint-1/{f} changed");
    }
    // It resumes (its checksums verified) into a roomy folder, to the model of the straight run.
    let resumed = d.join("resumed");
    let o = train_into(&d, &resumed).args(args).arg("--resume").arg(out.join("checkpoint-1")).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let model = |dir: &Path| std::fs::read(dir.join("model/model.safetensors")).unwrap();
    assert!(model(&resumed) == model(&reference), "the resumed run ends where the straight one did");
}

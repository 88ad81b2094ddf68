//! The training data pipeline (`runtime::data`): readers and their error messages, prompt templates byte for byte,
//! response-only labels, packing and padding, the resumable loader, the eval split. The tokenizer is a small
//! byte-level BPE trained here (SmolLM2's layout: `<|endoftext|>` 0, `<|im_start|>` 1, `<|im_end|>` 2, digits split,
//! GPT-2 byte-level regex); the chat template and special tokens are SmolLM2-135M-Instruct's
//! (`tests/data/tokenizer_config.json`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use runtime::data::{
    alpaca_prompt, eval_batches, read_records, render, split_eval, AlpacaRecord, Batch, BatchOptions, ChatTemplate,
    DataError, Dataset, DatasetOptions, EvalSplit, Layout, LoaderPosition, LoaderState, LossOn, Message, PromptFormat,
    ReadOptions, Record, Role, Schema, SpecialTokens, TextTokenizer, TokenizedExample, TokenizerConfig, TrainLoader,
    IGNORE_INDEX,
};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// The text the fixture tokenizer is trained on: the Alpaca prompts, ChatML and the fixtures' words.
fn corpus() -> Vec<String> {
    let mut lines = vec![
        alpaca_prompt("Give three tips for staying healthy.", ""),
        alpaca_prompt("Translate the phrase to French.", "Good morning"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n".into(),
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n".into(),
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n".into(),
        "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.".into(),
        "Bonjour. Hello. Hi. You are terse. Count to 3. Say nothing. Name a colour. Blue.".into(),
        "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun.".into(),
    ];
    let again = lines.clone();
    lines.extend(again.iter().cloned());
    lines.extend(again);
    lines
}

/// `tokenizer.json` of the fixture tokenizer (trained once per test process).
fn tokenizer_json() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::digits::Digits;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::{
            AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
            TokenizerBuilder,
        };
        let pre = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
        let mut t = TokenizerBuilder::<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default().into())
        .with_pre_tokenizer(Some(pre.into()))
        // SmolLM2's post-processor: byte-level, trimming offsets (the pipeline removes it).
        .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .expect("tokenizer");
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(700)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        t.train(&mut trainer, corpus().into_iter()).expect("train");
        let t = tokenizers::Tokenizer::from(t);
        for (id, s) in specials.iter().enumerate() {
            assert_eq!(t.token_to_id(s), Some(id as u32), "special token {s}");
        }
        // Named by its content, written whole then renamed: test processes running at once never see half a file,
        // and reruns reuse it.
        let json = t.to_string(false).expect("tokenizer JSON");
        let hash = json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data-fixture");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("tokenizer-{hash:016x}.json"));
        if !path.exists() {
            let part = dir.join(format!("tokenizer-{hash:016x}.json.{}", std::process::id()));
            std::fs::write(&part, json).unwrap();
            std::fs::rename(&part, &path).unwrap();
        }
        path
    })
}

fn config() -> TokenizerConfig {
    TokenizerConfig::load(&data("tokenizer_config.json")).expect("tokenizer_config.json")
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(tokenizer_json(), config().special).expect("tokenizer")
}

fn chatml() -> PromptFormat {
    let c = config();
    PromptFormat::Chat(ChatTemplate::new(&c.chat_template.unwrap(), &c.special).unwrap())
}

fn opts(seq_len: usize) -> DatasetOptions {
    DatasetOptions { read: ReadOptions::default(), loss_on: LossOn::Responses, seq_len }
}

/// The decoded text of each run of consecutive target tokens.
fn target_runs(t: &TextTokenizer, e: &TokenizedExample) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (id, target) in e.ids.iter().zip(&e.targets) {
        if *target {
            run.push(*id);
        } else if !run.is_empty() {
            runs.push(t.decode(&std::mem::take(&mut run)).unwrap());
        }
    }
    if !run.is_empty() {
        runs.push(t.decode(&run).unwrap());
    }
    runs
}

fn messages(err: &[DataError]) -> Vec<String> {
    err.iter().map(ToString::to_string).collect()
}

// ---- readers ----

#[test]
fn reads_alpaca_json_array_with_record_lines() {
    let r = read_records(&data("alpaca.json"), &ReadOptions::default()).unwrap();
    assert_eq!((r.layout, r.schema), (Layout::JsonArray, Schema::Alpaca));
    assert!(r.skipped.is_empty());
    let lines: Vec<usize> = r.records.iter().map(|r| r.line).collect();
    assert_eq!(lines, [2, 7, 12]);
    assert_eq!(
        r.records[1].record,
        Record::Alpaca(AlpacaRecord {
            instruction: "Translate the phrase to French.".into(),
            input: "Good morning".into(),
            output: "Bonjour".into(),
        })
    );
    let Record::Alpaca(a) = &r.records[0].record else { panic!() };
    assert_eq!(a.output, "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.");
    assert_eq!(a.input, "");
}

#[test]
fn reads_alpaca_jsonl_skipping_blank_lines_and_missing_input() {
    let r = read_records(&data("alpaca.jsonl"), &ReadOptions::default()).unwrap();
    assert_eq!((r.layout, r.schema), (Layout::JsonLines, Schema::Alpaca));
    let lines: Vec<usize> = r.records.iter().map(|r| r.line).collect();
    assert_eq!(lines, [1, 3, 4]);
    let json = read_records(&data("alpaca.json"), &ReadOptions::default()).unwrap();
    let records = |r: &runtime::data::Records| r.records.iter().map(|s| s.record.clone()).collect::<Vec<_>>();
    assert_eq!(records(&r), records(&json), "the JSON and JSONL fixtures hold the same records");
}

#[test]
fn reads_chat_jsonl() {
    let r = read_records(&data("chat.jsonl"), &ReadOptions::default()).unwrap();
    assert_eq!((r.layout, r.schema), (Layout::JsonLines, Schema::Chat));
    assert_eq!(r.records.len(), 3);
    let Record::Chat(m) = &r.records[1].record else { panic!("expected a chat") };
    let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User, Role::Assistant]);
    assert_eq!(m[4], Message::new(Role::Assistant, "1 2 3"));
}

#[test]
fn format_is_detected_from_content_and_can_be_overridden() {
    let dir = tempfile::tempdir().unwrap();
    // JSON lines in a .json file (what HF `datasets` writes), and a chat JSON array.
    let lines = dir.path().join("lines.json");
    std::fs::copy(data("chat.jsonl"), &lines).unwrap();
    let r = read_records(&lines, &ReadOptions::default()).unwrap();
    assert_eq!((r.layout, r.schema, r.records.len()), (Layout::JsonLines, Schema::Chat, 3));
    let array = dir.path().join("chat.json");
    std::fs::write(&array, "[\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n]\n").unwrap();
    let r = read_records(&array, &ReadOptions::default()).unwrap();
    assert_eq!((r.layout, r.schema, r.records[0].line), (Layout::JsonArray, Schema::Chat, 2));

    // An explicit schema: the Alpaca reader on a chat file complains about the Alpaca fields.
    let forced = ReadOptions { schema: Some(Schema::Alpaca), ..ReadOptions::default() };
    let e = read_records(&data("chat.jsonl"), &forced).unwrap_err();
    assert_eq!(e.to_string(), format!("{}:1: missing field \"instruction\"", data("chat.jsonl").display()));
    // An explicit layout: a JSON array read as JSON lines fails on its first line.
    let forced = ReadOptions { layout: Some(Layout::JsonLines), ..ReadOptions::default() };
    let e = read_records(&data("alpaca.json"), &forced).unwrap_err();
    assert_eq!(e.to_string(), format!("{}:1:1: invalid JSON: EOF while parsing a list", data("alpaca.json").display()));

    let e = read_records(&data("unknown.jsonl"), &ReadOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:1: cannot tell the data format: the first record has neither \"messages\" (chat) nor \"instruction\" \
             and \"output\" (Alpaca); its keys are [\"completion\", \"prompt\"]",
            data("unknown.jsonl").display()
        )
    );
}

#[test]
fn malformed_alpaca_jsonl_records_name_file_line_and_field() {
    let p = data("alpaca_bad.jsonl");
    let e = read_records(&p, &ReadOptions::default()).unwrap_err();
    assert!(e.is_record());
    assert_eq!(e.to_string(), format!("{}:2: field \"output\": expected a string, found number", p.display()));

    let r = read_records(&p, &ReadOptions { skip_bad: true, ..ReadOptions::default() }).unwrap();
    let f = p.display();
    assert_eq!(
        messages(&r.skipped),
        [
            format!("{f}:2: field \"output\": expected a string, found number"),
            format!("{f}:3: missing field \"instruction\""),
            format!("{f}:4:42: invalid JSON: EOF while parsing an object"),
            format!("{f}:5: expected a JSON object, found array"),
            format!("{f}:7: field \"input\": expected a string, found number"),
        ]
    );
    // Lines 1 and 6 are good (a null input is no input).
    assert_eq!(r.records.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 6]);
    assert_eq!(
        r.records[1].record,
        Record::Alpaca(AlpacaRecord { instruction: "Say hi.".into(), input: String::new(), output: "Hi.".into() })
    );
}

#[test]
fn malformed_alpaca_json_array_record_names_the_line_where_it_starts() {
    let p = data("alpaca_bad.json");
    let e = read_records(&p, &ReadOptions::default()).unwrap_err();
    assert_eq!(e.to_string(), format!("{}:3: field \"output\": expected a string, found number", p.display()));
    let r = read_records(&p, &ReadOptions { skip_bad: true, ..ReadOptions::default() }).unwrap();
    assert_eq!(r.records.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 8]);
    assert_eq!(r.skipped.len(), 1);
}

#[test]
fn invalid_json_inside_an_array_fails_even_with_skip_bad() {
    let p = data("alpaca_syntax.json");
    let expected = format!("{}:6:5: invalid JSON: expected `,` or `}}`", p.display());
    let e = read_records(&p, &ReadOptions::default()).unwrap_err();
    assert_eq!(e.to_string(), expected);
    let e = read_records(&p, &ReadOptions { skip_bad: true, ..ReadOptions::default() }).unwrap_err();
    assert_eq!(e.to_string(), expected);
}

#[test]
fn malformed_chat_records_name_file_line_and_field() {
    let p = data("chat_bad.jsonl");
    let e = read_records(&p, &ReadOptions::default()).unwrap_err();
    let f = p.display();
    assert_eq!(
        e.to_string(),
        format!(
            "{f}:2: field \"messages[0].role\": unknown role \"bot\" (expected \"system\", \"user\" or \"assistant\")"
        )
    );
    let r = read_records(&p, &ReadOptions { skip_bad: true, ..ReadOptions::default() }).unwrap();
    assert_eq!(r.records.len(), 1);
    assert_eq!(
        messages(&r.skipped),
        [
            format!(
                "{f}:2: field \"messages[0].role\": unknown role \"bot\" (expected \"system\", \"user\" or \"assistant\")"
            ),
            format!("{f}:3: field \"messages\": empty messages (a chat needs at least one message)"),
            format!("{f}:4: missing field \"messages\""),
            format!("{f}:5: field \"messages[0].content\": expected a string, found array"),
            format!("{f}:6: field \"messages[1]\": expected an object, found string"),
            format!("{f}:7: missing field \"messages[0].role\""),
        ]
    );
}

#[test]
fn skip_bad_counts_reach_the_dataset_report() {
    let t = tokenizer();
    let o = DatasetOptions { read: ReadOptions { skip_bad: true, ..ReadOptions::default() }, ..opts(256) };
    let d = Dataset::load(&data("alpaca_bad.jsonl"), &PromptFormat::Alpaca, &t, &o).unwrap();
    assert_eq!((d.report.records, d.report.skipped.len(), d.report.examples), (2, 5, 2));
    assert!(d.report.to_string().contains("2 records, 5 skipped as bad"), "{}", d.report);

    // Records that fail to render are skipped too, with their line: here chats given the Alpaca template.
    let d = Dataset::load(&data("chat.jsonl"), &PromptFormat::Alpaca, &t, &o);
    let e = d.unwrap_err().to_string();
    assert!(e.contains("no examples to train on") && e.contains("3 skipped as bad"), "{e}");
    let strict = Dataset::load(&data("chat.jsonl"), &PromptFormat::Alpaca, &t, &opts(256)).unwrap_err();
    assert_eq!(
        strict.to_string(),
        format!(
            "{}:1: a chat record needs a chat template: the Alpaca format takes Alpaca records only",
            data("chat.jsonl").display()
        )
    );
}

// ---- templates ----

#[test]
fn alpaca_prompt_is_byte_exact() {
    // FACTS.md, "Prompt formats".
    assert_eq!(
        alpaca_prompt("Translate the phrase to French.", "Good morning"),
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a \
         response that appropriately completes the request.\n\n### Instruction:\nTranslate the phrase to French.\n\n\
         ### Input:\nGood morning\n\n### Response:\n"
    );
    assert_eq!(
        alpaca_prompt("What is 2 + 2?", ""),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\
         \n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\n"
    );
    // Braces in the record are text, never placeholders.
    assert!(alpaca_prompt("Print {input}", "{instruction}")
        .contains("### Instruction:\nPrint {input}\n\n### Input:\n{instruction}\n"));

    let record =
        Record::Alpaca(AlpacaRecord { instruction: "Say hi.".into(), input: String::new(), output: "Hi.".into() });
    let r = render(&record, &PromptFormat::Alpaca, &config().special).unwrap();
    let prompt = alpaca_prompt("Say hi.", "");
    assert_eq!(r.text, format!("{prompt}Hi.<|im_end|>"));
    assert_eq!(r.responses.len(), 1);
    assert_eq!(r.responses[0], prompt.len()..r.text.len());
}

#[test]
fn chatml_template_renders_byte_exact() {
    let c = config();
    let t = ChatTemplate::new(c.chat_template.as_deref().unwrap(), &c.special).unwrap();
    let q = Message::new(Role::User, "What is the capital of France?");
    let a = Message::new(Role::Assistant, "The capital of France is Paris.");
    let default_system =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    assert_eq!(
        t.render(&[q.clone(), a.clone()], false).unwrap(),
        format!(
            "{default_system}<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe \
             capital of France is Paris.<|im_end|>\n"
        )
    );
    assert_eq!(
        t.render(std::slice::from_ref(&q), true).unwrap(),
        format!("{default_system}<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    );
    let system = Message::new(Role::System, "You are terse.");
    assert_eq!(
        t.render(&[system, q], false).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    );

    // Alpaca records through the chat template: user = instruction + "\n\n" + input, assistant = output.
    let record = Record::Alpaca(AlpacaRecord {
        instruction: "Translate the phrase to French.".into(),
        input: "Good morning".into(),
        output: "Bonjour".into(),
    });
    let r = render(&record, &chatml(), &c.special).unwrap();
    assert_eq!(
        r.text,
        format!(
            "{default_system}<|im_start|>user\nTranslate the phrase to French.\n\nGood morning<|im_end|>\n\
             <|im_start|>assistant\nBonjour<|im_end|>\n"
        )
    );
    assert_eq!(&r.text[r.responses[0].clone()], "Bonjour<|im_end|>\n");
}

#[test]
fn chat_templates_get_hf_globals_loop_vars_and_python_methods() {
    let special = SpecialTokens { bos: Some("<s>".into()), eos: "</s>".into(), pad: None, unk: None };
    let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}\
        {{ raise_exception('bad role') }}{% endif %}[{{ loop.index0 }}{% if loop.first %}F{% endif %}:{{ m.role }}]\
        {{ m['content'] | trim }}|{{ m.content.strip() }}|{{ m.content.upper() }}|\
        {{ m.content.startswith(' Hi') }}{% if loop.last %}{{ eos_token }}{% endif %}\n\
        {% endfor %}{% if add_generation_prompt %}<gen>{% endif %}{% if tools is not none %}tools!{% endif %}";
    let t = ChatTemplate::new(source, &special).unwrap();
    let m = [Message::new(Role::User, " Hi there "), Message::new(Role::Assistant, "ok")];
    // What transformers' Jinja environment renders (checked with transformers 5.23): Python's True/False, and the
    // newline after `{% endif %}` trimmed (trim_blocks).
    assert_eq!(
        t.render(&m, true).unwrap(),
        "<s>[0F:user]Hi there|Hi there| HI THERE |True[1:assistant]ok|ok|OK|False</s><gen>"
    );

    // raise_exception carries the template's message.
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}x",
        &special,
    )
    .unwrap();
    let e = t.render(&[Message::new(Role::Assistant, "a")], false).unwrap_err().to_string();
    assert!(e.contains("Conversation roles must start with user"), "{e}");

    // tojson as Python's json.dumps: keys in record order, ", " and ": " separators, non-ASCII kept.
    let t = ChatTemplate::new("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}", &special).unwrap();
    let out = t.render(&[Message::new(Role::User, "Hi \"you\" é")], false).unwrap();
    assert_eq!(
        out,
        "[{\"role\": \"user\", \"content\": \"Hi \\\"you\\\" é\"}]|{\n  \"role\": \"user\",\n  \"content\": \"Hi \\\"you\\\" é\"\n}"
    );

    // {% break %} (HF enables loopcontrols), and whitespace control as HF sets it (trim_blocks, lstrip_blocks).
    let t = ChatTemplate::new(
        "{% for m in messages %}\n    {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.content }}\n{% endfor %}",
        &special,
    )
    .unwrap();
    assert_eq!(t.render(&m, false).unwrap(), " Hi there \n");

    assert!(ChatTemplate::new("{% for %}", &special).unwrap_err().to_string().starts_with("chat template: "));
}

// ---- tokens and labels ----

#[test]
fn alpaca_labels_only_the_output_and_eos() {
    let t = tokenizer();
    let d = Dataset::load(&data("alpaca.json"), &PromptFormat::Alpaca, &t, &opts(512)).unwrap();
    assert_eq!(d.report.truncated, 0);
    let runs: Vec<Vec<String>> = d.examples.iter().map(|e| target_runs(&t, e)).collect();
    assert_eq!(
        runs,
        [
            vec!["1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.<|im_end|>".to_string()],
            vec!["Bonjour<|im_end|>".to_string()],
            vec!["4<|im_end|>".to_string()],
        ]
    );
    let e = &d.examples[1];
    // No BOS added: the text starts with the template's first word.
    assert_ne!(e.ids[0], t.bos_id().unwrap());
    assert_eq!(*e.ids.last().unwrap(), t.eos_id());
    // The prompt decodes back to the Alpaca prompt, byte for byte.
    let first = e.targets.iter().position(|t| *t).unwrap();
    assert_eq!(t.decode(&e.ids[..first]).unwrap(), alpaca_prompt("Translate the phrase to French.", "Good morning"));
    // Labels are shifted: the last prompt position predicts the first response token; the last position nothing.
    let labels: Vec<i32> = e.labels(IGNORE_INDEX).collect();
    assert!(labels[..first - 1].iter().all(|l| *l == IGNORE_INDEX));
    for (i, l) in labels.iter().enumerate().take(e.len() - 1).skip(first - 1) {
        assert_eq!(*l, e.ids[i + 1] as i32, "position {i}");
    }
    assert_eq!(*labels.last().unwrap(), IGNORE_INDEX);
    assert_eq!(e.label_count(), e.len() - first);
}

#[test]
fn chat_labels_only_assistant_turns() {
    let t = tokenizer();
    let d = Dataset::load(&data("chat.jsonl"), &chatml(), &t, &opts(512)).unwrap();
    let runs: Vec<Vec<String>> = d.examples.iter().map(|e| target_runs(&t, e)).collect();
    assert_eq!(
        runs,
        [
            vec!["The capital of France is Paris.<|im_end|>\n".to_string()],
            vec!["Hello.<|im_end|>\n".to_string(), "1 2 3<|im_end|>\n".to_string()],
            // An empty answer still teaches the end of the turn.
            vec!["<|im_end|>\n".to_string()],
        ]
    );
    // Every <|im_start|> comes from the template (the default system turn, user, assistant); none is added in front.
    let starts = d.examples[0].ids.iter().filter(|id| **id == t.bos_id().unwrap()).count();
    assert_eq!(starts, 3);
}

#[test]
fn tokens_equal_tokenizing_the_whole_text() {
    let t = tokenizer();
    let plain = tokenizers::Tokenizer::from_file(tokenizer_json()).unwrap();
    for (path, format) in [("alpaca.json", PromptFormat::Alpaca), ("chat.jsonl", chatml()), ("alpaca.json", chatml())] {
        let records = read_records(&data(path), &ReadOptions::default()).unwrap();
        let d = Dataset::build(records, &format, &t, &opts(512)).unwrap();
        let records = read_records(&data(path), &ReadOptions::default()).unwrap();
        for (r, e) in records.records.iter().zip(&d.examples) {
            let text = render(&r.record, &format, t.special()).unwrap().text;
            let whole = plain.encode(text.as_str(), false).unwrap();
            assert_eq!(e.ids, whole.get_ids(), "{path}:{}", r.line);
            assert_eq!(t.decode(&e.ids).unwrap(), text);
        }
    }
}

#[test]
fn no_bos_is_added_even_when_the_tokenizer_file_adds_one() {
    use tokenizers::processors::template::TemplateProcessing;
    let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json()).unwrap();
    let bos_first = TemplateProcessing::builder()
        .try_single("<|im_start|> $A")
        .unwrap()
        .special_tokens(vec![("<|im_start|>", 1)])
        .build()
        .unwrap();
    inner.with_post_processor(Some(bos_first));
    assert_eq!(inner.encode("Hi", true).unwrap().get_ids()[0], 1, "the file's post-processor adds BOS");
    let t = TextTokenizer::new(inner, Path::new("llama-like/tokenizer.json"), config().special).unwrap();
    let ids = t.encode("Hi").unwrap().ids;
    assert_ne!(ids[0], 1);
    assert_eq!(t.decode(&ids).unwrap(), "Hi");
}

#[test]
fn all_token_loss_labels_every_next_token() {
    let t = tokenizer();
    let o = DatasetOptions { loss_on: LossOn::AllTokens, ..opts(512) };
    let d = Dataset::load(&data("chat.jsonl"), &chatml(), &t, &o).unwrap();
    for e in &d.examples {
        let labels: Vec<i32> = e.labels(IGNORE_INDEX).collect();
        let expected: Vec<i32> = e.ids[1..].iter().map(|id| *id as i32).chain([IGNORE_INDEX]).collect();
        assert_eq!(labels, expected);
    }
}

#[test]
fn response_spans_need_a_template_whose_prefixes_agree() {
    // The end marker depends on loop.last: the conversation before the answer is not a prefix of the whole.
    let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if loop.last %}<end>{% endif %}{% endfor %}\
                  {% if add_generation_prompt %}<assistant>{% endif %}";
    let c = config();
    let format = PromptFormat::Chat(ChatTemplate::new(source, &c.special).unwrap());
    let t = tokenizer();
    let e = Dataset::load(&data("chat.jsonl"), &format, &t, &opts(512)).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:1: chat template: the template does not render", data("chat.jsonl").display())),
        "{e}"
    );
    // Training on all tokens needs no spans.
    let o = DatasetOptions { loss_on: LossOn::AllTokens, ..opts(512) };
    let d = Dataset::load(&data("chat.jsonl"), &format, &t, &o).unwrap();
    assert_eq!(
        t.decode(&d.examples[0].ids).unwrap(),
        "<user>What is the capital of France?<assistant>The capital of France is Paris.<end>"
    );
}

#[test]
fn special_tokens_must_be_single_added_tokens() {
    let e = TextTokenizer::from_file(tokenizer_json(), SpecialTokens::eos("</s>")).err().unwrap();
    assert!(e.to_string().contains("no EOS token \"</s>\" in the vocabulary"), "{e}");
    let c = config();
    assert_eq!(c.special.bos.as_deref(), Some("<|im_start|>"));
    assert_eq!(c.special.pad.as_deref(), Some("<|im_end|>"));
    let t = tokenizer();
    assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (Some(1), 2, 2));
}

#[test]
fn long_examples_are_truncated_and_counted() {
    let t = tokenizer();
    let full = Dataset::load(&data("alpaca.json"), &PromptFormat::Alpaca, &t, &opts(512)).unwrap();
    let lens: Vec<usize> = full.examples.iter().map(TokenizedExample::len).collect();
    let longest = *lens.iter().max().unwrap();
    let seq_len = longest - 2;
    let d = Dataset::load(&data("alpaca.json"), &PromptFormat::Alpaca, &t, &opts(seq_len)).unwrap();
    let expected = lens.iter().filter(|l| **l > seq_len).count();
    assert!(expected >= 1);
    assert_eq!(d.report.truncated, expected);
    assert!(d.examples.iter().all(|e| e.len() <= seq_len));
    // Cut where the long ones were: a prefix of the full tokens.
    for (cut, whole) in d.examples.iter().zip(&full.examples) {
        assert_eq!(cut.ids[..], whole.ids[..cut.len()]);
    }

    // A prompt longer than seq_len leaves nothing to learn: dropped and counted.
    let e = Dataset::load(&data("alpaca.json"), &PromptFormat::Alpaca, &t, &opts(16)).unwrap_err().to_string();
    assert!(e.contains("3 truncated to 16 tokens, 3 without targets dropped"), "{e}");
    let o = DatasetOptions { loss_on: LossOn::AllTokens, ..opts(16) };
    let d = Dataset::load(&data("alpaca.json"), &PromptFormat::Alpaca, &t, &o).unwrap();
    assert_eq!((d.report.truncated, d.report.without_targets, d.report.labels), (3, 0, 45));
}

// ---- batches ----

fn example(line: usize, ids: &[u32], targets: &[bool]) -> TokenizedExample {
    TokenizedExample { line, ids: ids.to_vec(), targets: targets.to_vec() }
}

fn three_examples() -> Vec<TokenizedExample> {
    vec![
        example(1, &[10, 11, 12], &[false, true, true]),
        // Its first token is marked a target, yet the previous example's last label must not point at it.
        example(2, &[20, 21], &[true, true]),
        example(3, &[30, 31, 32, 33], &[false, false, true, true]),
    ]
}

fn batch_opts(micro_batch: usize, seq_len: usize, packing: bool) -> BatchOptions {
    BatchOptions { micro_batch, seq_len, packing, shuffle: false, seed: 0, pad_id: 0, vocab: 1 << 16 }
}

#[test]
fn packing_keeps_examples_apart() {
    let mut l = TrainLoader::new(three_examples(), batch_opts(2, 6, true)).unwrap();
    let b = l.next_batch();
    let x = IGNORE_INDEX;
    assert_eq!(b.input_ids, [10, 11, 12, 20, 21, 0, 30, 31, 32, 33, 0, 0]);
    assert_eq!(b.position_ids, [0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 1]);
    assert_eq!(b.segment_ids, [0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 1, 1]);
    assert_eq!(b.labels, [11, 12, x, 21, x, x, x, 32, 33, x, x, x]);
    assert_eq!((b.examples, b.tokens, b.label_count), (3, 9, 5));
    assert_eq!(b.start, LoaderPosition { epoch: 0, index: 0 });
    assert_eq!(l.position(), LoaderPosition { epoch: 1, index: 0 });
    let names: Vec<&str> = b
        .inputs()
        .iter()
        .map(|(n, v)| {
            assert_eq!(v.len(), 12);
            *n
        })
        .collect();
    assert_eq!(names, ["input_ids", "position_ids", "segment_ids", "labels"]);
}

#[test]
fn padding_puts_one_example_per_row() {
    let mut l = TrainLoader::new(three_examples(), BatchOptions { pad_id: 2, ..batch_opts(2, 4, false) }).unwrap();
    assert_eq!(l.batches_in_epoch(0), 2);
    let x = IGNORE_INDEX;
    let b = l.next_batch();
    assert_eq!(b.input_ids, [10, 11, 12, 2, 20, 21, 2, 2]);
    assert_eq!(b.position_ids, [0, 1, 2, 0, 0, 1, 0, 1]);
    assert_eq!(b.segment_ids, [0, 0, 0, 1, 0, 0, 1, 1]);
    assert_eq!(b.labels, [11, 12, x, x, 21, x, x, x]);
    assert_eq!(l.position(), LoaderPosition { epoch: 0, index: 2 });
    // The epoch's last batch: one example and a row of padding only (never the next epoch's examples).
    let b = l.next_batch();
    assert_eq!(b.input_ids, [30, 31, 32, 33, 2, 2, 2, 2]);
    assert_eq!(b.position_ids, [0, 1, 2, 3, 0, 1, 2, 3]);
    assert_eq!(b.segment_ids, [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(b.labels, [x, 32, 33, x, x, x, x, x]);
    assert_eq!((b.examples, b.tokens, b.label_count), (1, 4, 2));
    assert_eq!(l.position(), LoaderPosition { epoch: 1, index: 0 });
    assert_eq!(l.next_batch().input_ids[..4], [10, 11, 12, 2]);

    let e = TrainLoader::new(three_examples(), batch_opts(2, 3, false)).err().unwrap();
    assert!(e.to_string().contains("the example of line 3 has 4 tokens"), "{e}");
}

#[test]
fn packed_real_batches_have_the_plan_shapes() {
    let t = tokenizer();
    let d = Dataset::load(&data("chat.jsonl"), &chatml(), &t, &opts(128)).unwrap();
    let opts = BatchOptions {
        micro_batch: 2,
        seq_len: 128,
        packing: true,
        shuffle: true,
        seed: 3,
        pad_id: t.pad_id(),
        vocab: t.vocab_size(),
    };
    let mut l = TrainLoader::new(d.examples.clone(), opts).unwrap();
    let b = l.next_batch();
    assert_eq!((b.input_ids.len(), b.labels.len()), (256, 256));
    assert_eq!(b.examples, 3);
    // Each segment of a row starts at position 0 and its last position has no label.
    for row in 0..2 {
        let r = row * 128..(row + 1) * 128;
        let (seg, pos, lab) = (&b.segment_ids[r.clone()], &b.position_ids[r.clone()], &b.labels[r]);
        for i in 0..128 {
            if i == 0 || seg[i] != seg[i - 1] {
                assert_eq!(pos[i], 0);
            } else {
                assert_eq!(pos[i], pos[i - 1] + 1);
            }
            if i + 1 == 128 || seg[i + 1] != seg[i] {
                assert_eq!(lab[i], IGNORE_INDEX);
            }
        }
    }
    let labelled: usize = d.examples.iter().map(TokenizedExample::label_count).sum();
    assert_eq!(b.label_count, labelled);
}

fn varied_examples(n: usize) -> Vec<TokenizedExample> {
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7) % 6;
            let ids: Vec<u32> = (0..len).map(|j| (100 * i + j) as u32).collect();
            example(i + 1, &ids, &vec![true; len])
        })
        .collect()
}

#[test]
fn shuffling_is_seeded_and_resumes_exactly() {
    let opts =
        BatchOptions { micro_batch: 2, seq_len: 8, packing: true, shuffle: true, seed: 7, pad_id: 0, vocab: 1 << 16 };
    let reference: Vec<Batch> = TrainLoader::new(varied_examples(11), opts).unwrap().take(14).collect();
    let again: Vec<Batch> = TrainLoader::new(varied_examples(11), opts).unwrap().take(14).collect();
    assert_eq!(reference, again);

    let l = TrainLoader::new(varied_examples(11), opts).unwrap();
    let other = TrainLoader::new(varied_examples(11), BatchOptions { seed: 8, ..opts }).unwrap();
    assert_ne!(l.order_of(0), other.order_of(0));
    assert_ne!(l.order_of(0), l.order_of(1), "each epoch has its own order");
    let mut sorted = l.order_of(0);
    sorted.sort();
    assert_eq!(sorted, (0..11).collect::<Vec<u32>>());

    // Every epoch takes each example once.
    let epochs = reference.iter().map(|b| b.start.epoch).max().unwrap();
    assert!(epochs >= 2, "the run spans epochs");
    for epoch in 0..epochs {
        let taken: usize = reference.iter().filter(|b| b.start.epoch == epoch).map(|b| b.examples).sum();
        assert_eq!(taken, 11, "epoch {epoch}");
        let batches = reference.iter().filter(|b| b.start.epoch == epoch).count();
        assert_eq!(batches, l.batches_in_epoch(epoch));
    }

    // Stop after k batches, save the state as a checkpoint would (JSON), restore into a fresh loader.
    for k in 0..reference.len() {
        let mut first = TrainLoader::new(varied_examples(11), opts).unwrap();
        for _ in 0..k {
            first.next_batch();
        }
        let saved = serde_json::to_value(first.state()).unwrap();
        let state: LoaderState = serde_json::from_value(saved).unwrap();
        let mut resumed = TrainLoader::new(varied_examples(11), opts).unwrap();
        resumed.restore(&state).unwrap();
        let rest: Vec<Batch> = resumed.take(reference.len() - k).collect();
        assert_eq!(rest[..], reference[k..], "resumed after {k} batches");
    }

    // Other data or options: refused.
    let state = TrainLoader::new(varied_examples(11), opts).unwrap().state();
    let mut other = TrainLoader::new(varied_examples(12), opts).unwrap();
    assert!(other.restore(&state).unwrap_err().to_string().contains("other data or batch options"));
    let mut l = TrainLoader::new(varied_examples(11), opts).unwrap();
    assert!(l.seek(LoaderPosition { epoch: 0, index: 12 }).is_err());
    l.seek(LoaderPosition { epoch: 3, index: 11 }).unwrap();
    assert_eq!(l.position(), LoaderPosition { epoch: 4, index: 0 });
}

#[test]
fn eval_split_is_seeded_disjoint_and_batched_in_order() {
    let items: Vec<usize> = (0..10).collect();
    let (train, eval) = split_eval(items.clone(), EvalSplit::Fraction(0.25), 1).unwrap();
    assert_eq!((train.len(), eval.len()), (7, 3), "a fraction rounds up");
    assert!(train.iter().all(|i| !eval.contains(i)));
    let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
    all.sort();
    assert_eq!(all, items);
    assert!(eval.windows(2).all(|w| w[0] < w[1]), "file order kept");
    assert_eq!(split_eval(items.clone(), EvalSplit::Fraction(0.25), 1).unwrap(), (train.clone(), eval.clone()));
    assert_ne!(split_eval(items.clone(), EvalSplit::Fraction(0.25), 2).unwrap().1, eval);
    assert_eq!(split_eval(items.clone(), EvalSplit::Count(4), 1).unwrap().1.len(), 4);
    assert!(split_eval(items.clone(), EvalSplit::Count(10), 1).is_err());
    assert!(split_eval(items, EvalSplit::Fraction(1.0), 1).is_err());

    // On a dataset: the eval examples leave the training set; eval batches take them once, in order.
    let t = tokenizer();
    let mut d = Dataset::load(&data("chat.jsonl"), &chatml(), &t, &opts(128)).unwrap();
    let all = d.examples.clone();
    let eval = d.split_eval(EvalSplit::Count(2), 5).unwrap();
    assert_eq!((d.examples.len(), eval.len()), (1, 2));
    assert!(eval.iter().all(|e| !d.examples.contains(e)));
    assert!(d.split_eval(EvalSplit::Count(1), 5).is_err());
    assert_eq!(d.examples.len(), 1, "a refused split keeps the examples");
    let opts = BatchOptions {
        micro_batch: 1,
        seq_len: 128,
        packing: false,
        shuffle: true,
        seed: 9,
        pad_id: t.pad_id(),
        vocab: t.vocab_size(),
    };
    let batches: Vec<Batch> = eval_batches(&eval, &opts).unwrap().collect();
    assert_eq!(batches.len(), 2);
    for (b, e) in batches.iter().zip(&eval) {
        assert_eq!(b.input_ids[..e.len()], e.ids.iter().map(|i| *i as i32).collect::<Vec<_>>()[..]);
    }
    let lines: Vec<usize> = eval.iter().map(|e| e.line).collect();
    assert!(lines.windows(2).all(|w| w[0] < w[1]));
    assert!(all.iter().filter(|e| lines.contains(&e.line)).count() == 2);
}

// ---- the real data set ----

/// `alpaca_en_demo.json` as scripts/fetch_assets.sh downloads it.
#[test]
fn real_alpaca_en_demo_loads_all_999_records() {
    let dir = match std::env::var_os("TUNEC_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tunec/assets"),
    };
    let path = dir.join("alpaca_en_demo.json");
    assert!(path.exists(), "{} is missing: run scripts/fetch_assets.sh first", path.display());
    let r = read_records(&path, &ReadOptions::default()).unwrap();
    assert_eq!((r.layout, r.schema, r.records.len(), r.skipped.len()), (Layout::JsonArray, Schema::Alpaca, 999, 0));
    assert_eq!(r.records[0].line, 2);
    let Record::Alpaca(a) = &r.records[0].record else { panic!() };
    assert_eq!(a.instruction, "Describe a process of making crepes.");
    let with_input = r.records.iter().filter(|r| matches!(&r.record, Record::Alpaca(a) if !a.input.is_empty())).count();
    assert_eq!(with_input, 412);

    // All of them render and tokenize (fixture tokenizer), in both formats.
    let t = tokenizer();
    for format in [PromptFormat::Alpaca, chatml()] {
        let d = Dataset::load(&path, &format, &t, &opts(4096)).unwrap();
        assert_eq!((d.report.records, d.report.skipped.len(), d.report.examples), (999, 0, 999), "{}", d.report);
    }
}

// ---- hostile inputs (issue 11) ----

/// A temporary directory holding `tokenizer_config.json` (SmolLM2's special tokens) with `template` as its
/// `chat_template`.
fn config_with_template(template: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("tokenizer_config.json")).unwrap())
            .expect("tokenizer_config.json");
    v["chat_template"] = serde_json::Value::from(template);
    let path = dir.path().join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    (dir, path)
}

fn template_from(path: &Path) -> Result<ChatTemplate, DataError> {
    Ok(ChatTemplate::from_config(&TokenizerConfig::load(path)?)?.expect("a chat template"))
}

fn hi() -> Vec<Message> {
    vec![Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Hello")]
}

#[test]
fn a_chat_template_that_loops_runs_out_of_fuel_naming_its_file() {
    let (_dir, path) = config_with_template(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}{{ eos_token }}",
    );
    let t = template_from(&path).unwrap();
    assert_eq!(t.origin(), Some(path.as_path()));
    let start = std::time::Instant::now();
    let e = t.render(&hi(), false).unwrap_err();
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(matches!(e, DataError::TemplateLimit(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("ran out of fuel after 10000000 instructions") && e.contains("may loop forever"), "{e}");

    // In a dataset it is the template's fault, not a record's: skip_bad does not skip record after record.
    let format = PromptFormat::Chat(t);
    let o = DatasetOptions { read: ReadOptions { skip_bad: true, ..ReadOptions::default() }, ..opts(128) };
    let e = Dataset::load(&data("chat.jsonl"), &format, &tokenizer(), &o).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:1: chat template: {}", data("chat.jsonl").display(), path.display())), "{e}");
}

#[test]
fn a_chat_template_writing_100_mb_is_refused() {
    let (_dir, path) = config_with_template("{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}");
    let e = template_from(&path).unwrap().render(&hi(), false).unwrap_err();
    assert!(matches!(e, DataError::TemplateLimit(_)), "{e:?}");
    assert!(e.to_string().contains("wrote more than 33554432 bytes"), "{e}");

    // Filters that would allocate what the template asks for are bounded too.
    let (_dir, path) = config_with_template("{{ 'a\nb' | indent(1000000000000) }}");
    let e = template_from(&path).unwrap().render(&hi(), false).unwrap_err().to_string();
    assert!(e.contains("indent: 1000000000000 spaces on 2 lines is past the limits"), "{e}");
    let (_dir, path) = config_with_template("{{ ('\n' * 10000000) | indent(1000, blank=true) }}");
    assert!(template_from(&path).unwrap().render(&hi(), false).is_err());
    // The filter itself is minijinja's.
    let (_dir, path) = config_with_template("{{ 'a\n\nb\n' | indent(2) }}|{{ 'a\nb' | indent(width=1, first=true) }}");
    assert_eq!(template_from(&path).unwrap().render(&hi(), false).unwrap(), "a\n\n  b| a\n b");
}

#[test]
fn chat_template_recursion_is_bounded_and_syntax_errors_name_the_file() {
    let (_dir, path) = config_with_template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
    let e = template_from(&path).unwrap().render(&hi(), false).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("recursion"), "{e}");

    let (_dir, path) = config_with_template("{% for %}");
    let e = template_from(&path).unwrap_err().to_string();
    assert!(e.starts_with(&format!("chat template: {}: syntax error", path.display())), "{e}");

    // A template beside the config (chat_template.jinja) is named by its own file.
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("tokenizer_config.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.path().join("tokenizer_config.json"), v.to_string()).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let e = template_from(&dir.path().join("tokenizer_config.json")).unwrap_err().to_string();
    assert!(e.contains(&dir.path().join("chat_template.jinja").display().to_string()), "{e}");
}

#[test]
fn devices_fifos_and_directories_are_refused_before_reading() {
    #[cfg(unix)]
    {
        let e = read_records(Path::new("/dev/zero"), &ReadOptions::default()).unwrap_err().to_string();
        assert_eq!(
            e,
            "/dev/zero: not a regular file but a character device: tunec reads data, tokenizer and template files \
             whole, and reading this may never end; copy it to a file first"
        );
        let e = TokenizerConfig::load(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("not a regular file but a character device"), "{e}");
        let e = TextTokenizer::from_file(Path::new("/dev/urandom"), SpecialTokens::eos("x")).unwrap_err().to_string();
        assert!(e.contains("not a regular file but a character device"), "{e}");

        // A FIFO nobody writes to: opening it would block forever.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("data.jsonl");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
        if made {
            let e = read_records(&fifo, &ReadOptions::default()).unwrap_err().to_string();
            assert!(e.contains("not a regular file but a FIFO (named pipe)"), "{e}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let e = read_records(dir.path(), &ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not a regular file but a directory"), "{e}");
}

#[test]
fn a_record_past_64_mib_is_a_bad_record() {
    use runtime::data::reader::{parse_records, MAX_RECORD_BYTES};
    let good = r#"{"instruction": "Name a colour.", "output": "Blue."}"#;
    let huge = format!(r#"{{"instruction": "x", "output": "{}"}}"#, "y".repeat(MAX_RECORD_BYTES));
    let path = Path::new("big.jsonl");
    let text = format!("{good}\n{huge}\n{good}\n");
    let e = parse_records(path, &text, &ReadOptions::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "big.jsonl:2: the record is {} bytes, over the limit of 67108864 bytes (MAX_RECORD_BYTES); shorten it, \
             or skip it with --skip-bad",
            huge.len()
        )
    );
    let r = parse_records(path, &text, &ReadOptions { skip_bad: true, ..ReadOptions::default() }).unwrap();
    assert_eq!((r.records.len(), r.skipped.len()), (2, 1));
    // An element of a JSON array too.
    let text = format!("[\n{good},\n{huge}\n]");
    let r = parse_records(Path::new("big.json"), &text, &ReadOptions { skip_bad: true, ..ReadOptions::default() });
    let r = r.unwrap();
    assert_eq!((r.records.len(), r.skipped.len()), (1, 1));
    assert!(r.skipped[0].to_string().starts_with("big.json:3: the record is"), "{}", r.skipped[0]);
}

#[test]
fn a_huge_record_is_cut_before_it_is_tokenized() {
    use runtime::data::dataset::{max_text_bytes, MAX_BYTES_PER_TOKEN};
    use runtime::data::reader::parse_records;
    let t = tokenizer();
    let seq_len = 128;
    let words = |n: usize| "The quick brown fox jumps over the lazy dog. ".repeat(n);
    let record = |output: &str| {
        let line = serde_json::json!({"instruction": "Say something.", "output": output});
        format!("{line}\n")
    };
    // 20 MB of output: only max_text_bytes(seq_len) of it is tokenized.
    let huge = words(450_000);
    assert!(huge.len() > 20_000_000);
    let small = words(50);
    let text = record(&huge) + &record(&small);
    let start = std::time::Instant::now();
    for (format, loss_on) in [(PromptFormat::Alpaca, LossOn::Responses), (chatml(), LossOn::AllTokens)] {
        let records = parse_records(Path::new("huge.jsonl"), &text, &ReadOptions::default()).unwrap();
        let o = DatasetOptions { loss_on, ..opts(seq_len) };
        let d = Dataset::build(records, &format, &t, &o).unwrap();
        assert_eq!(d.report.truncated, 2, "{}", d.report);
        // The first seq_len tokens are those of the whole text (a shorter one with the same start shows them).
        assert_eq!(d.examples[0], TokenizedExample { line: 1, ..d.examples[1].clone() });
        assert_eq!(d.examples[0].len(), seq_len);
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "{:?}", start.elapsed());
    assert_eq!(max_text_bytes(seq_len), seq_len * MAX_BYTES_PER_TOKEN);

    // Cutting a record: its text in order up to the bound, at a character boundary; messages past it dropped.
    let chat = Record::Chat(vec![
        Message::new(Role::User, "héllo"),
        Message::new(Role::Assistant, "world"),
        Message::new(Role::User, "again"),
    ]);
    assert_eq!(chat.cut(100, 100), None);
    assert_eq!(
        chat.cut(8, 100),
        Some(Record::Chat(vec![Message::new(Role::User, "héllo"), Message::new(Role::Assistant, "wo")]))
    );
    assert_eq!(chat.cut(2, 100), Some(Record::Chat(vec![Message::new(Role::User, "h")])));
    assert_eq!(
        chat.cut(100, 2),
        Some(Record::Chat(vec![Message::new(Role::User, "héllo"), Message::new(Role::Assistant, "world")]))
    );
    let a = Record::Alpaca(AlpacaRecord { instruction: "abc".into(), input: "de".into(), output: "fgh".into() });
    assert_eq!(
        a.cut(6, 1),
        Some(Record::Alpaca(AlpacaRecord { instruction: "abc".into(), input: "de".into(), output: "f".into() }))
    );
}

/// The fixture tokenizer with `<|tool|>` added: an id past the vocabulary of a model built for the fixture.
fn tokenizer_with_added_token(dir: &Path) -> (TextTokenizer, u32) {
    let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json()).unwrap();
    inner.add_special_tokens(vec![tokenizers::AddedToken::from("<|tool|>", true)]).unwrap();
    let id = inner.token_to_id("<|tool|>").unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, inner.to_string(false).unwrap()).unwrap();
    (TextTokenizer::from_file(&path, config().special).unwrap(), id)
}

#[test]
fn token_ids_past_the_model_vocabulary_are_refused_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (t, tool) = tokenizer_with_added_token(dir.path());
    let vocab = tool as usize; // the model's: the tokenizer's before the added token
    let data_path = dir.path().join("data.jsonl");
    std::fs::write(
        &data_path,
        "{\"instruction\": \"Name a colour.\", \"output\": \"Blue.\"}\n\
         {\"instruction\": \"Call a tool.\", \"output\": \"<|tool|> Blue.\"}\n",
    )
    .unwrap();
    let d = Dataset::load(&data_path, &PromptFormat::Alpaca, &t, &opts(256)).unwrap();
    let e = d.check_vocab(&t, vocab).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}:2: token id {tool} \"<|tool|>\" (tokenizer {}) is outside the model's vocabulary of {vocab} (ids \
             0..{vocab}): the tokenizer does not match the model: use the tokenizer of the model you train (--model \
             or --tokenizer), or a plan compiled for this tokenizer's vocabulary",
            data_path.display(),
            dir.path().join("tokenizer.json").display()
        )
    );
    d.check_vocab(&t, vocab + 1).unwrap();
    // The pad token too.
    let e = d.check_vocab(&t, 2).unwrap_err().to_string();
    assert!(e.contains("the pad token \"<|im_end|>\" has id 2, outside the model's vocabulary of 2"), "{e}");

    // The loader refuses them too, whatever backend its batches go to.
    let bopts = BatchOptions {
        micro_batch: 1,
        seq_len: 256,
        packing: true,
        shuffle: false,
        seed: 0,
        pad_id: t.pad_id(),
        vocab,
    };
    let e = TrainLoader::new(d.examples.clone(), bopts).err().unwrap().to_string();
    assert!(e.contains(&format!("the example of line 2 holds token id {tool}, outside the model's vocabulary")), "{e}");
    let e = eval_batches(&d.examples, &bopts).err().unwrap().to_string();
    assert!(e.contains(&format!("holds token id {tool}")), "{e}");
    TrainLoader::new(d.examples.clone(), BatchOptions { vocab: vocab + 1, ..bopts }).unwrap();
}

#[test]
fn the_batch_check_covers_every_id_and_the_pad_id() {
    // Labels are ids of the next token: the last token of an example is one too.
    let bad = vec![example(7, &[1, 2, 50], &[false, true, true])];
    let e = TrainLoader::new(bad, BatchOptions { vocab: 50, ..batch_opts(1, 4, false) }).err().unwrap().to_string();
    assert!(e.contains("line 7 holds token id 50, outside the model's vocabulary of 50"), "{e}");
    let e = TrainLoader::new(three_examples(), BatchOptions { pad_id: 40, vocab: 40, ..batch_opts(2, 6, true) });
    let e = e.err().unwrap().to_string();
    assert!(e.contains("the pad token id 40 is outside the model's vocabulary of 40"), "{e}");
    TrainLoader::new(three_examples(), BatchOptions { pad_id: 39, vocab: 40, ..batch_opts(2, 6, true) }).unwrap();
}

#[test]
fn a_capped_eval_split_keeps_the_rest_in_training() {
    use runtime::data::split::split_eval_at_most;
    let items: Vec<usize> = (0..2000).collect();
    let (train, eval) = split_eval_at_most(items.clone(), EvalSplit::Fraction(0.05), 64, 3).unwrap();
    assert_eq!((train.len(), eval.len()), (1936, 64));
    let (_, uncapped) = split_eval(items.clone(), EvalSplit::Fraction(0.05), 3).unwrap();
    assert_eq!(uncapped.len(), 100);
    assert_eq!(eval[..], uncapped[..64], "the eval examples are those the uncapped split starts with");
    assert!(uncapped[64..].iter().all(|i| train.contains(i)), "drawn past the cap: trained on");
    let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
    all.sort();
    assert_eq!(all, items, "every item is trained on or evaluated");
    // Under the cap nothing changes.
    assert_eq!(
        split_eval_at_most(items.clone(), EvalSplit::Count(32), 64, 3).unwrap(),
        split_eval(items, EvalSplit::Count(32), 3).unwrap()
    );
}

#[test]
fn the_data_report_accounts_for_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.jsonl");
    let long = "zebra quagga okapi ".repeat(200);
    let mut lines: Vec<String> = (0..4)
        .map(|i| serde_json::json!({"instruction": format!("Count to {i}."), "output": "Blue."}).to_string())
        .collect();
    lines.push(serde_json::json!({"instruction": long, "output": "Blue."}).to_string());
    lines.push("{\"instruction\": 3, \"output\": \"Blue.\"}".into());
    std::fs::write(&path, lines.join("\n")).unwrap();
    let o = DatasetOptions { read: ReadOptions { skip_bad: true, ..ReadOptions::default() }, ..opts(128) };
    let mut d = Dataset::load(&path, &PromptFormat::Alpaca, &tokenizer(), &o).unwrap();
    let eval = d.split_eval_at_most(EvalSplit::Fraction(0.5), 1, 0).unwrap();
    let r = &d.report;
    assert_eq!((r.total, d.examples.len(), eval.len(), r.dropped()), (6, 3, 1, 2));
    assert_eq!(d.examples.len() + eval.len() + r.dropped(), r.total);
    let line = r.partition(d.examples.len(), eval.len());
    assert!(
        line.starts_with(
            "6 records → 3 train, 1 eval, 2 skipped (1 skipped as bad, 1 without target tokens within 128 tokens); \
             1 truncated to 128 tokens;"
        ),
        "{line}"
    );
}

#[test]
fn text_from_files_is_escaped_in_messages() {
    use runtime::data::reader::parse_records;
    let line = r#"{"messages": [{"role": "\u001b[2Jroot", "content": "x"}]}"#;
    let e = parse_records(Path::new("c.jsonl"), line, &ReadOptions::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        "c.jsonl:1: field \"messages[0].role\": unknown role \"\\u{1b}[2Jroot\" (expected \"system\", \"user\" or \
         \"assistant\")"
    );
    let keys = r#"{"a\nb": 1}"#;
    let e = parse_records(Path::new("k.jsonl"), keys, &ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("its keys are [\"a\\nb\"]"), "{e}");
    let (_dir, path) = config_with_template("{{ raise_exception('\x1b[2Jgone' ~ 'x' * 1000) }}");
    let e = template_from(&path).unwrap().render(&hi(), false).unwrap_err().to_string();
    assert!(e.contains("\\u{1b}[2Jgone") && !e.contains('\x1b') && e.len() < 600, "{e}");
}

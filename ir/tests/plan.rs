//! The plan file: write/read round trip, atomic writes, and a clear error (never a panic) for every way a file can be
//! wrong — not a plan, another format version, truncated, corrupt, undecodable, a graph that does not verify; the
//! signature block's framing; bounded reading of plan files (no FIFO, device or over-long file is read through).

use ir::plan::{
    build_plan, AdapterSettings, KernelCode, Plan, PlanBuffer, PlanError, PlanSource, Region, TrainSettings,
    ValuePlacement, FORMAT_VERSION, HEADER_BYTES, MAGIC, MAX_PLAN_BYTES, SIGNATURE_BYTES, SIGNATURE_MAGIC,
};
use std::path::Path;

/// y = x·Wᵀ as one kernel, with an NF4 weight, a trainable bias-free LoRA-style weight and a step output.
const GRAPH: &str = r#"graph "small" {
  %0 = param {name="w", role=frozen, init=load} : nf4<64,256>[4,64]
  %1 = param {name="a", role=trainable, init=zeros} : f32[4,64]
  %2 = input {name="x"} : f32[2,64]
  %3 = matmul(%2, %1) {ta=false, tb=true} : f32[2,4] ; a
  %4 = add(%3, %3) : f32[2,4]
  output logits = %4
  kernel "matmul:a" = [%3, %4]
}
"#;

fn source() -> PlanSource {
    let graph = ir::text::parse(GRAPH).expect("parses");
    ir::verify::verify(&graph).expect("verifies");
    let buf = |region, offset, bytes, first| PlanBuffer { region, offset, bytes, start: 0, end: 1, first };
    PlanSource {
        recipe: "small".into(),
        target: "h100".into(),
        graph,
        values: vec![
            ValuePlacement::Owns(0),
            ValuePlacement::Owns(1),
            ValuePlacement::Owns(2),
            ValuePlacement::None,
            ValuePlacement::Owns(3),
        ],
        buffers: vec![
            buf(Region::Persistent, 0, 256, 0),
            buf(Region::Persistent, 256, 1024, 1),
            buf(Region::Persistent, 1280, 512, 2),
            buf(Region::Arena, 0, 256, 4),
        ],
        arena_bytes: 256,
        persistent_bytes: 1792,
        train: TrainSettings {
            seq_len: 8,
            micro_batch: 2,
            steps: 10,
            warmup_steps: 1,
            save_every: 5,
            ..TrainSettings::default()
        },
        peft: Some(AdapterSettings {
            method: "qlora".into(),
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            use_dora: false,
        }),
        model_config: vec![("arch".into(), "\"llama\"".into()), ("hidden".into(), "64".into())],
    }
}

fn plan() -> Plan {
    let mut p = build_plan(source()).expect("consistent");
    // Code blobs round-trip too (codegen fills them later).
    p.kernels[0].ptx.insert(80, ".version 8.0\n.target sm_80\n".into());
    p.kernels[0].llvm_ir = Some("define void @k() { ret void }".into());
    p.kernels[0].host_object = Some(vec![0x7f, b'E', b'L', b'F', 0, 255]);
    p.host_library = Some(vec![1, 2, 3, 200]);
    p
}

fn bytes() -> Vec<u8> {
    plan().to_bytes().expect("encodes")
}

/// Re-encodes a file around a changed payload with a valid header and checksum.
fn with_payload(payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn bindings_are_derived_from_the_graph() {
    let p = plan();
    let names: Vec<_> = p.params.iter().map(|b| (b.name.as_str(), b.role, b.dtype.to_string(), b.bytes)).collect();
    assert_eq!(
        names,
        [
            ("w", ir::Role::Frozen, "nf4<64,256>".to_string(), 128 + 4 + 4 + 4),
            ("a", ir::Role::Trainable, "f32".into(), 1024)
        ]
    );
    assert_eq!(p.inputs.len(), 1);
    assert_eq!((p.inputs[0].name.as_str(), p.inputs[0].shape.as_slice()), ("x", &[2, 64][..]));
    assert_eq!(p.kernels.len(), 1);
    assert_eq!(p.kernels[0].name, "matmul:a");
    assert_eq!((p.format_version, p.tunec_version.as_str()), (FORMAT_VERSION, env!("CARGO_PKG_VERSION")));
}

#[test]
fn write_then_read_gives_the_same_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.bin");
    let p = plan();
    let written = p.write(&path).unwrap();
    assert_eq!(written, std::fs::metadata(&path).unwrap().len());
    let back = Plan::read_unverified(&path).unwrap();
    assert_eq!(back, p);
    // Writing over an existing plan replaces it, and leaves nothing else behind.
    let mut q = p.clone();
    q.recipe = "other".into();
    q.write(&path).unwrap();
    assert_eq!(Plan::read_unverified(&path).unwrap(), q);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["plan.bin"], "temporary files left behind");
}

#[test]
fn writing_into_a_missing_directory_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/plan.bin");
    let e = plan().write(&path).unwrap_err();
    assert!(matches!(e, PlanError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("no/such/dir/plan.bin"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "something was written");
}

#[test]
fn a_missing_file_is_an_io_error() {
    let e = Plan::read_unverified(Path::new("/nonexistent/plan.bin")).unwrap_err();
    assert!(matches!(e, PlanError::Io { .. }), "{e:?}");
    assert!(e.to_string().starts_with("/nonexistent/plan.bin: "), "{e}");
}

#[test]
fn a_file_that_is_not_a_plan_says_so() {
    for text in [&b"graph \"tiny\" { }\n........................"[..], b"{}", b"PK\x03\x04"] {
        let e = Plan::from_bytes(text).unwrap_err();
        assert!(matches!(e, PlanError::NotAPlan { .. }), "{e:?}");
        assert!(e.to_string().starts_with("not a tunec plan"), "{e}");
    }
    let mut b = bytes();
    b[0] = b'X';
    assert!(matches!(Plan::from_bytes(&b), Err(PlanError::NotAPlan { .. })));
}

#[test]
fn another_format_version_names_both_versions() {
    for other in [0, FORMAT_VERSION + 1, u32::MAX] {
        let mut b = bytes();
        b[8..12].copy_from_slice(&other.to_le_bytes());
        let e = Plan::from_bytes(&b).unwrap_err();
        assert!(matches!(e, PlanError::Version { found, expected } if found == other && expected == FORMAT_VERSION));
        let msg = e.to_string();
        assert!(msg.contains(&format!("plan format version {other}")), "{msg}");
        assert!(msg.contains(&format!("reads version {FORMAT_VERSION}")), "{msg}");
        assert!(msg.contains("recompile"), "{msg}");
    }
}

#[test]
fn a_truncated_file_says_how_much_is_missing() {
    let b = bytes();
    let total = b.len() as u64;
    for cut in [0, 3, 8, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, b.len() / 2, b.len() - 1] {
        let e = Plan::from_bytes(&b[..cut]).unwrap_err();
        let expected = if cut < HEADER_BYTES { HEADER_BYTES as u64 } else { total };
        assert!(
            matches!(e, PlanError::Truncated { expected: x, found } if x == expected && found == cut as u64),
            "cut at {cut}: {e:?}"
        );
        assert_eq!(e.to_string(), format!("truncated plan: expected {expected} bytes, found {cut}"));
    }
    // A header claiming an absurd payload is a truncation too, not an allocation.
    let mut huge = b.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(Plan::from_bytes(&huge), Err(PlanError::Truncated { .. })));
}

#[test]
fn bytes_after_the_payload_are_refused() {
    let mut b = bytes();
    b.extend_from_slice(b"junk");
    let e = Plan::from_bytes(&b).unwrap_err();
    assert!(matches!(e, PlanError::TrailingBytes { .. }), "{e:?}");
    assert!(e.to_string().contains("4 bytes after its payload"), "{e}");
}

#[test]
fn any_flipped_payload_byte_is_a_checksum_error() {
    let b = bytes();
    for at in (HEADER_BYTES..b.len()).step_by(7).chain([b.len() - 1]) {
        let mut c = b.clone();
        c[at] ^= 0x10;
        let e = Plan::from_bytes(&c).unwrap_err();
        assert!(matches!(e, PlanError::Checksum { .. }), "byte {at}: {e:?}");
        assert!(e.to_string().contains("the plan is corrupt"), "{e}");
    }
    // A damaged checksum field reads the same way.
    let mut c = b.clone();
    c[21] ^= 1;
    assert!(matches!(Plan::from_bytes(&c), Err(PlanError::Checksum { .. })));
}

#[test]
fn a_payload_that_does_not_decode_is_a_decode_error() {
    for payload in [&b""[..], b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x05abc"] {
        let e = Plan::from_bytes(&with_payload(payload)).unwrap_err();
        assert!(matches!(e, PlanError::Decode(_)), "{e:?}");
        assert!(e.to_string().starts_with("cannot decode the plan's payload"), "{e}");
    }
    // Every prefix of a good payload, re-checksummed, fails cleanly (never a panic).
    let good = bytes();
    let payload = &good[HEADER_BYTES..];
    for cut in 0..payload.len() {
        assert!(Plan::from_bytes(&with_payload(&payload[..cut])).is_err(), "prefix {cut} decoded");
    }
    // Extra bytes inside the checksummed payload are refused too.
    let mut longer = payload.to_vec();
    longer.push(0);
    assert!(matches!(Plan::from_bytes(&with_payload(&longer)), Err(PlanError::Decode(_))));
}

/// Replaces the graph text inside an encoded plan, keeping everything else (postcard: a string is a varint length
/// and its bytes), and re-checksums.
fn with_graph(p: &Plan, graph_text: &str) -> Vec<u8> {
    let good = p.to_bytes().unwrap();
    let payload = &good[HEADER_BYTES..];
    let old = ir::text::print(&p.graph);
    let at = payload.windows(old.len()).position(|w| w == old.as_bytes()).expect("graph text in the payload");
    let varint = |mut n: usize| {
        let mut v = vec![];
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                v.push(byte);
                return v;
            }
            v.push(byte | 0x80);
        }
    };
    let len_bytes = varint(old.len()).len();
    assert_eq!(&payload[at - len_bytes..at], varint(old.len()).as_slice());
    let mut out = payload[..at - len_bytes].to_vec();
    out.extend(varint(graph_text.len()));
    out.extend_from_slice(graph_text.as_bytes());
    out.extend_from_slice(&payload[at + old.len()..]);
    with_payload(&out)
}

#[test]
fn a_graph_that_does_not_verify_is_refused() {
    let p = plan();
    // The splice itself is sound: the unchanged text reads back.
    assert_eq!(Plan::from_bytes(&with_graph(&p, &ir::text::print(&p.graph))).unwrap(), p);
    // Declared type disagrees with the inputs (matmul gives f32[2,4]).
    let mismatched = ir::text::print(&p.graph).replace("tb=true} : f32[2,4]", "tb=true} : f32[2,5]");
    let e = Plan::from_bytes(&with_graph(&p, &mismatched)).unwrap_err();
    assert!(matches!(e, PlanError::Graph(_)), "{e:?}");
    assert!(e.to_string().starts_with("the plan's graph does not verify: %3 (matmul)"), "{e}");
    // Text that does not parse.
    let e = Plan::from_bytes(&with_graph(&p, "graph \"x\" { %0 = frobnicate() : f32[] }")).unwrap_err();
    assert!(matches!(e, PlanError::Graph(_)), "{e:?}");
}

/// A change to a plan's source.
type Edit = Box<dyn Fn(&mut PlanSource)>;

#[test]
fn a_memory_plan_that_does_not_fit_the_graph_is_refused() {
    let cases: Vec<(&str, Edit)> = vec![
        ("value placements for", Box::new(|s| s.values.truncate(3))),
        ("placed at Owns(9)", Box::new(|s| s.values[0] = ValuePlacement::Owns(9))),
        ("placed at Alias(99)", Box::new(|s| s.values[3] = ValuePlacement::Alias(99))),
        ("outside its region", Box::new(|s| s.arena_bytes = 100)),
        ("outside its region", Box::new(|s| s.buffers[0].offset = u64::MAX)),
    ];
    for (want, edit) in cases {
        let mut s = source();
        edit(&mut s);
        let e = build_plan(s).unwrap_err();
        assert!(matches!(e, PlanError::Inconsistent(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e} (wanted {want})");
    }
    let mut p = plan();
    p.kernels.push(KernelCode { name: "extra".into(), ..KernelCode::default() });
    assert!(matches!(p.check(), Err(PlanError::Inconsistent(m)) if m.contains("code for 2 kernels")));
    // Inconsistent plans are refused when read, too (a writer that skipped `check`).
    let bytes = p.to_bytes().unwrap();
    assert!(matches!(Plan::from_bytes(&bytes), Err(PlanError::Inconsistent(_))));
    let mut p = plan();
    p.kernels[0].name = "renamed".into();
    assert!(matches!(p.check(), Err(PlanError::Inconsistent(m)) if m.contains("`matmul:a` in the graph")));
}

#[test]
fn summary_names_what_is_in_the_plan() {
    let s = plan().summary();
    for want in [
        &*format!("plan small for h100 (plan format {FORMAT_VERSION}"),
        "5 nodes",
        "1 kernels",
        "frozen",
        "nf4<64,256> ×1",
        "trainable",
        "inputs: x f32[2,64]",
        "PTX sm_80 (1 kernels)",
        "host library 4 B",
        "adapter: qlora r=8 alpha=16.0 dropout=0.05",
        "model: arch=\"llama\", hidden=64",
    ] {
        assert!(s.contains(want), "summary lacks {want:?}:\n{s}");
    }
}

#[test]
fn a_kernel_argument_outside_the_graph_is_inconsistent() {
    let mut p = plan();
    p.kernels[0].args.push(ir::plan::KernelArg { value: 10_000, part: 0 });
    assert!(matches!(p.check(), Err(PlanError::Inconsistent(m)) if m.contains("%10000")));
    // …and a valid argument list survives the round trip.
    let mut p = plan();
    p.kernels[0].args = vec![ir::plan::KernelArg { value: 0, part: 0 }];
    p.kernels[0].launch = Some(ir::plan::KernelLaunch { grid: (2, 1, 1), block: 256, ..Default::default() });
    let back = Plan::from_bytes(&p.to_bytes().unwrap()).unwrap();
    assert_eq!(back.kernels[0].args, p.kernels[0].args);
    assert_eq!(back.kernels[0].launch, p.kernels[0].launch);
}

/// A stand-in MAC (the real one, HMAC-SHA256 with the user's key, is `runtime::trust`'s): the sum of the bytes.
fn fake_mac(m: &[u8]) -> [u8; 32] {
    let mut t = [0u8; 32];
    for (i, b) in m.iter().enumerate() {
        t[i % 32] = t[i % 32].wrapping_add(*b);
    }
    t
}

fn signed() -> Vec<u8> {
    ir::plan::attach_signature(bytes(), *b"keyid-01", fake_mac).unwrap()
}

#[test]
fn a_signature_block_is_framed_after_the_payload() {
    let unsigned = bytes();
    let f = ir::plan::split_signature(&unsigned).unwrap();
    assert!(f.signature.is_none());
    assert_eq!(f.plan, &unsigned[..]);
    let s = signed();
    assert_eq!(s.len(), unsigned.len() + SIGNATURE_BYTES);
    assert_eq!(&s[unsigned.len()..unsigned.len() + 8], &SIGNATURE_MAGIC);
    let f = ir::plan::split_signature(&s).unwrap();
    let sig = f.signature.expect("signed");
    assert_eq!(f.plan, &unsigned[..]);
    assert_eq!(&sig.key_id, b"keyid-01");
    // The tag covers everything before it: header, payload, the block's magic and key id.
    assert_eq!(sig.signed, &s[..s.len() - 32]);
    assert_eq!(sig.tag, fake_mac(sig.signed));
    // A signed plan decodes like the unsigned one (authenticating it is the runtime's work).
    assert_eq!(Plan::from_bytes(&s).unwrap(), plan());
    // Signing twice is refused.
    let e = ir::plan::attach_signature(s.clone(), [0; 8], fake_mac).unwrap_err();
    assert!(e.to_string().contains("signed already"), "{e}");
}

#[test]
fn a_truncated_signature_or_bytes_after_it_are_refused() {
    let s = signed();
    let end = bytes().len();
    for cut in [end + 1, end + 8, end + 9, end + 20, s.len() - 1] {
        let e = Plan::from_bytes(&s[..cut]).unwrap_err();
        assert!(matches!(e, PlanError::SignatureTruncated { found } if found == (cut - end) as u64), "{cut}: {e:?}");
        assert!(e.to_string().starts_with("truncated signature"), "{e}");
    }
    let mut longer = s.clone();
    longer.push(0);
    let e = Plan::from_bytes(&longer).unwrap_err();
    assert!(matches!(e, PlanError::AfterSignature { .. }), "{e:?}");
    assert!(e.to_string().contains("followed by 1 more bytes"), "{e}");
}

#[test]
fn a_signed_plan_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.bin");
    ir::plan::write_file(&path, &signed()).unwrap();
    assert_eq!(ir::plan::read_file(&path).unwrap(), signed());
    assert_eq!(Plan::read_unverified(&path).unwrap(), plan());
    // Extra bytes after the block in a file are refused (the reader stops one byte past what the header allows).
    let mut longer = signed();
    longer.extend_from_slice(&[7; 1000]);
    ir::plan::write_file(&path, &longer).unwrap();
    let e = ir::plan::read_file(&path).unwrap_err();
    assert!(
        matches!(e, PlanError::AfterSignature { expected, found } if expected == signed().len() as u64
            && found == longer.len() as u64),
        "{e:?}"
    );
    let mut junk = bytes();
    junk.extend_from_slice(b"junk");
    ir::plan::write_file(&path, &junk).unwrap();
    assert!(matches!(Plan::read_unverified(&path), Err(PlanError::TrailingBytes { .. })));
}

#[cfg(unix)]
#[test]
fn devices_fifos_and_directories_are_refused_without_reading() {
    // /dev/zero would be read forever; a FIFO would block the open until a writer came.
    let e = Plan::read_unverified(Path::new("/dev/zero")).unwrap_err();
    assert!(matches!(e, PlanError::NotAFile { kind: "a character device", .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "/dev/zero: not a regular file (a character device): a plan is a file written by `tunec compile -o`"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("plan.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let t0 = std::time::Instant::now();
    let e = Plan::read_unverified(&fifo).unwrap_err();
    assert!(matches!(e, PlanError::NotAFile { kind: "a FIFO", .. }), "{e:?}");
    assert!(t0.elapsed().as_secs() < 5, "blocked on the FIFO");
    let e = Plan::read_unverified(dir.path()).unwrap_err();
    assert!(matches!(e, PlanError::NotAFile { kind: "a directory", .. }), "{e:?}");
}

#[test]
fn a_header_declaring_more_than_the_largest_plan_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.bin");
    for declared in [MAX_PLAN_BYTES, u64::MAX] {
        let mut b = bytes();
        b[12..20].copy_from_slice(&declared.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let e = ir::plan::read_file(&path).unwrap_err();
        assert!(matches!(e, PlanError::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("ir::plan::MAX_PLAN_BYTES"), "{e}");
    }
    // The largest payload allowed is merely truncated here (the file is short), not refused as too large.
    let mut b = bytes();
    let most = MAX_PLAN_BYTES - (HEADER_BYTES + SIGNATURE_BYTES) as u64;
    b[12..20].copy_from_slice(&most.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let b = ir::plan::read_file(&path).unwrap();
    assert!(matches!(Plan::from_bytes(&b), Err(PlanError::Truncated { .. })));
    // A short or foreign file says what it is.
    std::fs::write(&path, b"TUNECPLN\x05").unwrap();
    assert!(matches!(ir::plan::read_file(&path), Err(PlanError::Truncated { expected: 24, found: 9 })));
    std::fs::write(&path, b"PK\x03\x04 a zip file").unwrap();
    assert!(matches!(ir::plan::read_file(&path), Err(PlanError::NotAPlan { .. })));
}

/// Sizes near 2^64 and indices out of range are refused by `check` (and so when a plan is read) with a message that
/// names the region, value, buffer or kernel; the arithmetic is checked, so nothing wraps (in release builds) or
/// panics (in test builds).
#[test]
fn sizes_near_2_64_and_bad_indices_are_refused_by_name() {
    type PlanEdit = Box<dyn Fn(&mut Plan)>;
    let cases: Vec<(&str, PlanEdit)> = vec![
        ("the arena is 18446744073709551605 bytes", Box::new(|p| p.arena_bytes = u64::MAX - 10)),
        ("the persistent region is", Box::new(|p| p.persistent_bytes = u64::MAX)),
        (
            "buffer 3 (Arena, offset 1, 18446744073709551615 bytes",
            Box::new(|p| {
                p.buffers[3].offset = 1;
                p.buffers[3].bytes = u64::MAX;
            }),
        ),
        ("buffer 2 (Persistent, offset 1536, 512 bytes", Box::new(|p| p.buffers[2].offset = 1536)),
        (
            "kernel 0 `matmul:a`: argument 1 takes value %4294967295",
            Box::new(|p| {
                p.kernels[0].args =
                    vec![ir::plan::KernelArg { value: 2, part: 0 }, ir::plan::KernelArg { value: u32::MAX, part: 0 }]
            }),
        ),
        ("parameter `a` (%1) is 1 storage bytes", Box::new(|p| p.params[1].bytes = 1)),
    ];
    for (want, edit) in cases {
        let mut p = plan();
        edit(&mut p);
        let e = p.check().unwrap_err();
        assert!(matches!(e, PlanError::Inconsistent(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e} (wanted {want})");
        // Through the file format, as a runtime gets it (params are derived from the graph, so not that one).
        if !want.starts_with("parameter") {
            let e = Plan::from_bytes(&p.to_bytes().unwrap()).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
    }
}

/// A graph whose shapes overflow, or whose NF4 block size is 0, is refused (the verifier or `check`), not a panic.
#[test]
fn value_sizes_that_overflow_are_refused() {
    for (ty, want) in [
        ("f32[4294967296,4294967296,4]", "overflows"),
        ("f32[4294967296,1048576]", "more than the limit"),
        ("nf4<64>[64]", "NF4 block size is 0"),
    ] {
        let text = format!("graph \"g\" {{\n  %0 = input {{name=\"x\"}} : {ty}\n  output logits = %0\n}}\n");
        let mut graph = ir::text::parse(&text).expect("parses");
        if ty.starts_with("nf4") {
            // The text parser refuses a block of 0; a graph built in memory can have one.
            graph.nodes[0].ty.dtype = ir::DType::Nf4(ir::Nf4Format { block: 0, double_quant: None });
        }
        let mut p = plan();
        p.graph = graph;
        p.values = vec![ValuePlacement::None];
        p.kernels.clear();
        p.params.clear();
        let e = p.check().unwrap_err();
        assert!(e.to_string().contains(want), "{ty}: {e} (wanted {want})");
    }
    assert_eq!(ir::plan::type_bytes(&ir::Type::f32(vec![2, 3])), Some(24));
    let nf4 = ir::DType::Nf4(ir::Nf4Format { block: 64, double_quant: Some(256) });
    assert_eq!(ir::plan::type_bytes(&ir::Type::new(nf4, vec![4, 64])), Some(128 + 4 + 4 + 4));
    assert_eq!(ir::plan::type_bytes(&ir::Type::new(nf4, vec![513])), Some(nf4.storage_bytes(513) as u64));
}

/// Kernels that share an entry symbol run the same code, so they take the same number of arguments and seeds.
#[test]
fn kernels_sharing_code_take_the_same_arguments() {
    let mut src = source();
    src.graph.kernels = vec![
        ir::Kernel { name: "matmul:a".into(), nodes: vec![ir::ValueId(3)] },
        ir::Kernel { name: "add".into(), nodes: vec![ir::ValueId(4)] },
    ];
    let mut p = build_plan(src).unwrap();
    let arg = |value| ir::plan::KernelArg { value, part: 0 };
    for k in &mut p.kernels {
        k.symbol = "tunec_k0".into();
        k.args = vec![arg(2), arg(1), arg(3)];
    }
    p.check().unwrap();
    p.kernels[1].args.pop();
    let e = p.check().unwrap_err().to_string();
    assert!(e.contains("kernel 1 `add`: it runs `tunec_k0` with 2 arguments and 0 seeds, but kernel 0"), "{e}");
    p.kernels[1].args.push(arg(4));
    p.kernels[1].seeds = vec![7];
    assert!(p.check().unwrap_err().to_string().contains("1 seeds"));
}

#[test]
fn a_plan_with_nonsense_settings_is_refused_naming_the_field() {
    // Issue 11, defect 5: a foreign plan's settings pass the same range checks as a recipe's.
    type Tamper = fn(&mut Plan);
    let cases: Vec<(Tamper, &str)> = vec![
        (|p| p.train.lr = f64::NAN, "train settings: `lr` must be a finite number > 0, found NaN"),
        (|p| p.train.beta1 = 2.0, "`beta1` must be a finite number in [0, 1), found 2.0"),
        (|p| p.train.steps = u64::MAX, "`steps` must be an integer in [1, 2147483647]"),
        (|p| p.peft.as_mut().unwrap().alpha = f64::INFINITY, "adapter settings: `alpha`"),
        (|p| p.model_config.push(("norm_eps".into(), "-1.0".into())), "model config: `norm_eps`"),
    ];
    for (set, want) in cases {
        let mut p = plan();
        set(&mut p);
        let err = Plan::from_bytes(&p.to_bytes().unwrap()).unwrap_err();
        assert!(matches!(err, PlanError::Settings(_)), "{err:?}");
        assert!(err.to_string().contains(want), "{err}");
    }
}

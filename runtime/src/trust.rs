//! Which plan files the runtime runs. A plan is native code: the cpu backend loads its host library into this
//! process and the cuda backend launches its PTX, both with the user's rights. So a plan file is decoded only after
//! it was authenticated, and every path that loads one (`run`, `bench`, `CpuBackend::load`, `CudaBackend::load`,
//! `cuda_step`, `inspect --verify`) goes through [`load_plan`].
//!
//! A plan is accepted when
//! - it is signed with this user's key: `tunec compile -o` appends HMAC-SHA256 over every byte before the tag
//!   (header, payload, the signature block's magic and key id; framing in `ir::plan`) with a 32-byte random key kept
//!   in the config dir ([`KEY_FILE`], mode 0600, created on first use); or
//! - the SHA-256 of the whole file is in the user's trust list ([`TRUST_LIST`], written by `tunec trust PLAN`, one
//!   hex digest and a note per line), whatever its signature; or
//! - the caller said `--trust-plan` (trust once).
//!
//! Everything else is refused, saying which case it is (unsigned, signed with another key, modified after signing)
//! and how to trust the plan. The config dir is `$TUNEC_HOME`, else `$XDG_CONFIG_HOME/tunec`, else
//! `~/.config/tunec`. A key or trust list that others can change (or read, for the key), or that another user owns,
//! is refused with the command that fixes it.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use ir::plan::{Plan, PlanError, KEY_ID_BYTES, TAG_BYTES};
use ir::untrusted::show;
use sha2::{Digest, Sha256};

/// The signing key's file in the config dir: 32 random bytes, mode 0600.
pub const KEY_FILE: &str = "plan-signing.key";
/// The trust list's file in the config dir: `<sha256 hex> <note>` per line, mode 0600.
pub const TRUST_LIST: &str = "trusted-plans";
/// The signing key's length.
pub const KEY_BYTES: usize = 32;
/// The largest trust list read (bytes).
pub const MAX_TRUST_LIST_BYTES: u64 = 16 << 20;
/// The environment variable naming the config dir.
pub const HOME_ENV: &str = "TUNEC_HOME";

type HmacSha256 = Hmac<Sha256>;

/// How the caller wants plans checked.
#[derive(Clone, Debug, Default)]
pub struct TrustOptions {
    /// `--trust-plan`: accept the plan whatever its signature (once; nothing is recorded).
    pub trust_once: bool,
    /// The config dir holding the key and the trust list; `None`: [`config_dir`] (from the environment).
    pub home: Option<PathBuf>,
}

impl TrustOptions {
    /// Options with an explicit config dir (tests; tools that keep their own).
    pub fn in_dir(dir: impl Into<PathBuf>) -> TrustOptions {
        TrustOptions { trust_once: false, home: Some(dir.into()) }
    }

    /// The config dir these options use.
    pub fn config_dir(&self) -> Result<PathBuf, TrustError> {
        match &self.home {
            Some(d) => Ok(d.clone()),
            None => config_dir(),
        }
    }
}

/// `--trust-plan` on `run` and `bench` (shared by `tunec` and `tunec-runner`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TrustArgs {
    /// Run this plan even if it is neither signed with your key nor in your trust list. A plan is native code: use
    /// this only for a plan whose origin you know (`tunec trust PLAN` remembers it instead).
    #[arg(long = "trust-plan")]
    pub trust_plan: bool,
}

impl TrustArgs {
    pub fn options(&self) -> TrustOptions {
        TrustOptions { trust_once: self.trust_plan, home: None }
    }
}

/// The config dir: `$TUNEC_HOME` if set, else `$XDG_CONFIG_HOME/tunec`, else `~/.config/tunec`.
pub fn config_dir() -> Result<PathBuf, TrustError> {
    config_dir_from(|k| std::env::var_os(k))
}

/// [`config_dir`] with the environment given by `env`.
fn config_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf, TrustError> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var(HOME_ENV) {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CONFIG_HOME").filter(|d| d.is_absolute()) {
        return Ok(d.join("tunec"));
    }
    match var("HOME") {
        Some(h) => Ok(h.join(".config").join("tunec")),
        None => Err(TrustError::Config(format!(
            "cannot find a config dir for the plan-signing key and the trust list: set {HOME_ENV} (or HOME)"
        ))),
    }
}

/// Why a plan was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Signed with this user's key.
    Signed { key_id: [u8; KEY_ID_BYTES] },
    /// Its SHA-256 is in the trust list, with this note.
    Listed { sha256: String, note: String },
    /// `--trust-plan`.
    Once,
}

impl std::fmt::Display for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Signed { key_id } => write!(f, "signed with your key (id {})", hex(key_id)),
            Trust::Listed { sha256, note } => write!(f, "in your trust list (sha256 {sha256}: {note})"),
            Trust::Once => write!(f, "trusted once (--trust-plan)"),
        }
    }
}

/// Why a plan was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No signature block.
    Unsigned,
    /// Signed with a key other than this user's (or this user has no key yet).
    ForeignKey { found: [u8; KEY_ID_BYTES], ours: Option<[u8; KEY_ID_BYTES]> },
    /// Signed with this user's key, but the tag does not match the content.
    Tampered { key_id: [u8; KEY_ID_BYTES] },
}

/// Everything [`load_plan`], signing and the trust list can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file is not a readable plan (not a plan, another version, truncated, corrupt, …).
    #[error("{}", plan_message(path, source))]
    Plan { path: PathBuf, source: PlanError },
    /// The plan is not trusted.
    #[error("{}", refusal_message(path, why, dir))]
    Refused { path: PathBuf, why: Refusal, dir: PathBuf },
    /// The signing key cannot be used.
    #[error("{}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    /// The trust list cannot be used.
    #[error("{}: {message}", path.display())]
    List { path: PathBuf, message: String },
    /// `tunec trust --sha256` was given a digest the file does not have.
    #[error(
        "{}: its SHA-256 is {found}, not {expected}: the file changed on its way here or is not the plan you meant; \
         nothing was trusted",
        path.display()
    )]
    Digest { path: PathBuf, expected: String, found: String },
    #[error("{0}")]
    Config(String),
}

fn plan_message(path: &Path, e: &PlanError) -> String {
    match e {
        // These name the path already.
        PlanError::Io { .. } | PlanError::NotAFile { .. } | PlanError::TooLarge { .. } => e.to_string(),
        e => format!("{}: {e}", path.display()),
    }
}

fn refusal_message(path: &Path, why: &Refusal, dir: &Path) -> String {
    let p = path.display();
    let key = dir.join(KEY_FILE);
    let case = match why {
        Refusal::Unsigned => "the plan is not signed (it has no signature block)".to_string(),
        Refusal::ForeignKey { found, ours: Some(ours) } => format!(
            "the plan is signed with another key (id {}); plans compiled here are signed with your key (id {}, {})",
            hex(found),
            hex(ours),
            key.display()
        ),
        Refusal::ForeignKey { found, ours: None } => format!(
            "the plan is signed with another key (id {}); you have no signing key yet ({} is created by your first \
             `tunec compile -o`)",
            hex(found),
            key.display()
        ),
        Refusal::Tampered { key_id } => format!(
            "the plan's signature (your key, id {}) does not match its content: the file was modified after it was \
             signed",
            hex(key_id)
        ),
    };
    format!(
        "{p}: refused: {case}. A plan is native code: its host library is loaded into this process and its kernels \
         run with your rights, so tunec runs only plans signed with your key or whose SHA-256 you trust. If you \
         compiled it, compile it again here; if you know where it came from and trust it, `tunec trust {p}` (or \
         `tunec-runner trust {p}`) records its SHA-256 in {}, or `--trust-plan` runs it once",
        dir.join(TRUST_LIST).display()
    )
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes`, as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A plan-signing key.
pub struct Key {
    bytes: [u8; KEY_BYTES],
    /// Where it lives.
    pub path: PathBuf,
}

impl Key {
    /// The first 8 bytes of the key's SHA-256: names the key in a signature block without revealing it.
    pub fn id(&self) -> [u8; KEY_ID_BYTES] {
        let mut id = [0; KEY_ID_BYTES];
        id.copy_from_slice(&Sha256::digest(self.bytes)[..KEY_ID_BYTES]);
        id
    }

    fn hmac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; ours is 32 bytes.
        <HmacSha256 as Mac>::new_from_slice(&self.bytes).expect("HMAC accepts any key length")
    }

    /// HMAC-SHA256 of `message`.
    pub fn tag(&self, message: &[u8]) -> [u8; TAG_BYTES] {
        let mut m = self.hmac();
        m.update(message);
        let mut tag = [0; TAG_BYTES];
        tag.copy_from_slice(&m.finalize().into_bytes());
        tag
    }

    /// Whether `tag` is the HMAC of `message` (constant time).
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        let mut m = self.hmac();
        m.update(message);
        m.verify_slice(tag).is_ok()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key {{ id: {}, path: {} }}", hex(&self.id()), self.path.display())
    }
}

/// The effective user id (files of the key and trust list must be the user's own).
#[cfg(unix)]
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks that a file of the config dir is the user's and that others have none of the `forbidden` permission bits.
fn check_private(file: &std::fs::File, path: &Path, forbidden: u32, what: &str) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err(format!("the {what} is not a regular file: remove it"));
        }
        if meta.uid() != euid() {
            return Err(format!(
                "the {what} is owned by uid {}, not by you (uid {}): another user could have written it; remove it \
                 (`rm {}`) and let tunec create a new one",
                meta.uid(),
                euid(),
                path.display()
            ));
        }
        let mode = meta.mode() & 0o777;
        if mode & forbidden != 0 {
            return Err(format!(
                "the {what} has mode {mode:04o}: others can {} it; fix it with `chmod 600 {}`{}",
                if forbidden & 0o044 != 0 { "read or change" } else { "change" },
                path.display(),
                if forbidden & 0o044 != 0 && mode & 0o044 != 0 {
                    " (and if someone else may have read it, delete it instead: a new key is made by the next \
                     `tunec compile -o`, and plans signed with the old one must be compiled again or trusted)"
                } else {
                    ""
                }
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path, forbidden, what);
    Ok(())
}

/// Creates the config dir (mode 0700) if it is missing.
fn create_dir(dir: &Path) -> Result<(), TrustError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| TrustError::Config(format!("{}: cannot create the config dir: {e}", dir.display())))
}

/// The user's key, if there is one; a key file that is not private, not the user's or not 32 bytes is an error.
pub fn load_key(dir: &Path) -> Result<Option<Key>, TrustError> {
    let path = dir.join(KEY_FILE);
    let bad = |message: String| TrustError::Key { path: path.clone(), message };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    check_private(&file, &path, 0o077, "plan-signing key").map_err(bad)?;
    let mut bytes = Vec::with_capacity(KEY_BYTES);
    file.take(KEY_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
    let bytes: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
        bad(format!(
            "the plan-signing key is {}{} bytes, a key is {KEY_BYTES}: remove it (`rm {}`); the next `tunec compile \
             -o` makes a new one",
            if bytes.len() > KEY_BYTES { "more than " } else { "" },
            bytes.len().min(KEY_BYTES),
            path.display()
        ))
    })?;
    Ok(Some(Key { bytes, path: path.clone() }))
}

/// The user's key, created (32 random bytes, mode 0600) if there is none; `true` when it was created now.
pub fn load_or_create_key(dir: &Path) -> Result<(Key, bool), TrustError> {
    if let Some(k) = load_key(dir)? {
        return Ok((k, false));
    }
    create_dir(dir)?;
    let path = dir.join(KEY_FILE);
    let bad = |message: String| TrustError::Key { path: path.clone(), message };
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| bad(format!("no random bytes for a new key: {e}")))?;
    // The whole key is written into a new private file (create_new, 0600 from the start: never readable by others,
    // not even for a moment) which is then linked into place; a link fails if another tunec made the key meanwhile,
    // and then that key is used.
    let tmp = dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let write = |f: &mut std::fs::File| f.write_all(&bytes).and_then(|_| f.sync_all());
    let mut f = options.open(&tmp).map_err(|e| bad(format!("cannot create {}: {e}", tmp.display())))?;
    let linked = write(&mut f).and_then(|_| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((Key { bytes, path }, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match load_key(dir)? {
            Some(k) => Ok((k, false)),
            None => Err(bad("the key appeared and vanished while it was being created; try again".into())),
        },
        Err(e) => Err(bad(format!("cannot create the plan-signing key: {e}"))),
    }
}

/// The trust list's entries: (sha256 hex, note); empty when there is none.
pub fn trust_list(dir: &Path) -> Result<Vec<(String, String)>, TrustError> {
    let path = dir.join(TRUST_LIST);
    let bad = |message: String| TrustError::List { path: path.clone(), message };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(bad(e.to_string())),
    };
    check_private(&file, &path, 0o022, "trust list").map_err(bad)?;
    let mut bytes = vec![];
    file.take(MAX_TRUST_LIST_BYTES + 1).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_TRUST_LIST_BYTES {
        return Err(bad(format!(
            "the trust list is larger than {MAX_TRUST_LIST_BYTES} bytes (runtime::trust::MAX_TRUST_LIST_BYTES): \
             remove the entries you no longer need"
        )));
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (digest, note) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if !is_sha256_hex(digest) {
            return Err(TrustError::List {
                path: path.clone(),
                message: format!(
                    "line {}: expected a SHA-256 (64 hex digits) and a note, found \"{}\": fix or delete the line",
                    i + 1,
                    show(line)
                ),
            });
        }
        // Notes are escaped when written; escaped again here for a list edited by hand (they reach the terminal).
        out.push((digest.to_ascii_lowercase(), show(note.trim())));
    }
    Ok(out)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Decides whether the plan file `bytes` (read from `path`) may run: its framing first (`ir::plan::split_signature`:
/// magic, version, length, a whole signature block), then `--trust-plan`, this user's signature, the trust list.
/// Decodes nothing beyond the fixed-size header.
pub fn verify(path: &Path, bytes: &[u8], opts: &TrustOptions) -> Result<Trust, TrustError> {
    let file = ir::plan::split_signature(bytes).map_err(|source| TrustError::Plan { path: path.into(), source })?;
    if opts.trust_once {
        return Ok(Trust::Once);
    }
    let dir = opts.config_dir()?;
    let why = match file.signature {
        None => Refusal::Unsigned,
        Some(sig) => match load_key(&dir)? {
            Some(key) if key.id() == sig.key_id => {
                if key.verify(sig.signed, &sig.tag) {
                    return Ok(Trust::Signed { key_id: sig.key_id });
                }
                Refusal::Tampered { key_id: sig.key_id }
            }
            key => Refusal::ForeignKey { found: sig.key_id, ours: key.map(|k| k.id()) },
        },
    };
    let digest = sha256_hex(bytes);
    if let Some((sha256, note)) = trust_list(&dir)?.into_iter().find(|(d, _)| *d == digest) {
        return Ok(Trust::Listed { sha256, note });
    }
    Err(TrustError::Refused { path: path.into(), why, dir })
}

/// Reads a plan file (bounded: `ir::plan::read_file`), authenticates it ([`verify`]) and only then decodes it. The
/// one way the runtime loads a plan file.
pub fn load_plan(path: &Path, opts: &TrustOptions) -> Result<(Plan, Trust), TrustError> {
    let plan_err = |source| TrustError::Plan { path: path.into(), source };
    let bytes = ir::plan::read_file(path).map_err(plan_err)?;
    let trust = verify(path, &bytes, opts)?;
    let plan = Plan::from_bytes(&bytes).map_err(plan_err)?;
    Ok((plan, trust))
}

/// What [`write_signed`] did.
#[derive(Debug)]
pub struct Signed {
    /// The file's size.
    pub bytes: u64,
    pub key_id: [u8; KEY_ID_BYTES],
    pub key_path: PathBuf,
    /// Whether the key was created for this plan.
    pub created_key: bool,
}

/// Writes `plan` to `path` (atomically) signed with the user's key, which is created on first use.
pub fn write_signed(plan: &Plan, path: &Path, opts: &TrustOptions) -> Result<Signed, TrustError> {
    let dir = opts.config_dir()?;
    let (key, created_key) = load_or_create_key(&dir)?;
    let plan_err = |source| TrustError::Plan { path: path.into(), source };
    let bytes = plan.to_bytes().map_err(plan_err)?;
    let signed = ir::plan::attach_signature(bytes, key.id(), |m| key.tag(m)).map_err(plan_err)?;
    let bytes = ir::plan::write_file(path, &signed).map_err(plan_err)?;
    Ok(Signed { bytes, key_id: key.id(), key_path: key.path.clone(), created_key })
}

/// What [`trust_file`] did.
#[derive(Debug)]
pub struct Trusted {
    pub sha256: String,
    pub note: String,
    /// The plan's summary line.
    pub plan: String,
    /// The digest was in the list already.
    pub already: bool,
    pub list: PathBuf,
}

/// `tunec trust PLAN`: reads the plan (it must decode as a plan; no code is loaded), checks its SHA-256 against
/// `expected` if given, and records the digest in the trust list (created 0600) with `note` (default: the path and
/// what the plan is).
pub fn trust_file(
    path: &Path,
    expected: Option<&str>,
    note: Option<&str>,
    opts: &TrustOptions,
) -> Result<Trusted, TrustError> {
    let plan_err = |source| TrustError::Plan { path: path.into(), source };
    let bytes = ir::plan::read_file(path).map_err(plan_err)?;
    let sha256 = sha256_hex(&bytes);
    if let Some(want) = expected {
        let want = want.trim().to_ascii_lowercase();
        if !is_sha256_hex(&want) {
            return Err(TrustError::Config(format!(
                "--sha256 {}: expected 64 hex digits (as `sha256sum` prints them)",
                show(&want)
            )));
        }
        if want != sha256 {
            return Err(TrustError::Digest { path: path.into(), expected: want, found: sha256 });
        }
    }
    let plan = Plan::from_bytes(&bytes).map_err(plan_err)?;
    let what = format!(
        "plan {} for {} (format {}, tunec {})",
        show(&plan.recipe),
        show(&plan.target),
        plan.format_version,
        show(&plan.tunec_version)
    );
    // One line per entry: the note is escaped (no newline can start a forged entry).
    let note = show(note.map_or_else(|| format!("{}: {what}", path.display()), str::to_string).trim());
    let dir = opts.config_dir()?;
    let list = dir.join(TRUST_LIST);
    let already = trust_list(&dir)?.iter().any(|(d, _)| *d == sha256);
    if !already {
        create_dir(&dir)?;
        let bad = |e: std::io::Error| TrustError::List { path: list.clone(), message: e.to_string() };
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&list).map_err(bad)?;
        check_private(&f, &list, 0o022, "trust list")
            .map_err(|message| TrustError::List { path: list.clone(), message })?;
        writeln!(f, "{sha256} {note}").and_then(|_| f.sync_all()).map_err(bad)?;
    }
    Ok(Trusted { sha256, note, plan: what, already, list })
}

/// One line for `tunec inspect`: whether `tunec run`/`bench` would run the plan file `bytes`, and why.
pub fn describe(path: &Path, bytes: &[u8], opts: &TrustOptions) -> String {
    match verify(path, bytes, opts) {
        Ok(t) => format!("trust: yes, {t}"),
        Err(TrustError::Refused { why, .. }) => {
            let why = match why {
                Refusal::Unsigned => "not signed".to_string(),
                Refusal::ForeignKey { found, .. } => format!("signed with another key (id {})", hex(&found)),
                Refusal::Tampered { .. } => "modified after it was signed".to_string(),
            };
            format!(
                "trust: NO, {why}; `tunec run`/`bench` refuse it (a plan is native code): `tunec trust {}` if you \
                 know where it came from",
                path.display()
            )
        }
        Err(e) => format!("trust: cannot tell: {e}"),
    }
}

/// `trust PLAN [--sha256 HEX] [--note TEXT]` (shared by `tunec` and `tunec-runner`).
#[derive(clap::Args, Clone, Debug)]
pub struct TrustCommand {
    /// The plan file to trust (after checking where it came from: a plan is native code).
    pub plan: PathBuf,
    /// Trust it only if its SHA-256 is this (64 hex digits, as `sha256sum` prints them).
    #[arg(long)]
    pub sha256: Option<String>,
    /// A note for the trust list (default: the path and what the plan is).
    #[arg(long)]
    pub note: Option<String>,
}

/// Runs `trust`: records the plan's digest in the trust list and says so.
pub fn trust_command(args: &TrustCommand) -> Result<(), String> {
    let t = trust_file(&args.plan, args.sha256.as_deref(), args.note.as_deref(), &TrustOptions::default())
        .map_err(|e| format!("error: {e}"))?;
    println!(
        "{} {}: {} (sha256 {}) in {}",
        if t.already { "already trusted" } else { "trusted" },
        args.plan.display(),
        t.plan,
        t.sha256,
        t.list.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::plan::{build_plan, PlanBuffer, PlanSource, Region, TrainSettings, ValuePlacement, HEADER_BYTES};

    fn plan() -> Plan {
        let graph = ir::text::parse(
            "graph \"t\" {\n  %0 = input {name=\"x\"} : f32[8]\n  %1 = add(%0, %0) : f32[8]\n  output logits = %1\n  \
             kernel \"add:y\" = [%1]\n}\n",
        )
        .unwrap();
        let buf = |region, first| PlanBuffer { region, offset: 0, bytes: 32, start: 0, end: 1, first };
        let mut p = build_plan(PlanSource {
            recipe: "t".into(),
            target: "cpu".into(),
            graph,
            values: vec![ValuePlacement::Owns(0), ValuePlacement::Owns(1)],
            buffers: vec![buf(Region::Persistent, 0), buf(Region::Arena, 1)],
            arena_bytes: 32,
            persistent_bytes: 32,
            train: TrainSettings {
                seq_len: 1,
                lr: 0.1,
                steps: 1,
                max_grad_norm: 0.0,
                seed: 1,
                save_every: 0,
                ..TrainSettings::default()
            },
            peft: None,
            model_config: vec![],
        })
        .unwrap();
        p.host_library = Some(b"\x7fELF not really".to_vec());
        p
    }

    /// A config dir, a signed plan file in it, and the options that use the dir.
    fn setup() -> (tempfile::TempDir, PathBuf, TrustOptions) {
        let dir = tempfile::tempdir().unwrap();
        let opts = TrustOptions::in_dir(dir.path().join("home"));
        let path = dir.path().join("p.plan");
        let s = write_signed(&plan(), &path, &opts).unwrap();
        assert!(s.created_key);
        (dir, path, opts)
    }

    fn refusal(e: TrustError) -> Refusal {
        match e {
            TrustError::Refused { why, .. } => why,
            e => panic!("not a refusal: {e}"),
        }
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_plan_signed_with_the_users_key_loads() {
        let (_d, path, opts) = setup();
        let (p, how) = load_plan(&path, &opts).unwrap();
        assert_eq!(p, plan());
        let key = load_key(opts.home.as_deref().unwrap()).unwrap().unwrap();
        assert_eq!(how, Trust::Signed { key_id: key.id() });
        // The key is made once: a second plan is signed with the same one.
        let again = write_signed(&plan(), &path, &opts).unwrap();
        assert!(!again.created_key);
        assert_eq!(again.key_id, key.id());
        assert!(matches!(load_plan(&path, &opts), Ok((_, Trust::Signed { .. }))));
    }

    #[cfg(unix)]
    #[test]
    fn the_key_is_private_and_a_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, path, opts) = setup();
        let home = opts.home.clone().unwrap();
        let key = home.join(KEY_FILE);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&home), 0o700);
        assert_eq!(std::fs::read(&key).unwrap().len(), KEY_BYTES);
        let left: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [KEY_FILE], "temporary files left behind");
        for bad in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = load_plan(&path, &opts).unwrap_err().to_string();
            assert!(
                e.contains(&format!("has mode {bad:04o}")) && e.contains(&format!("chmod 600 {}", key.display())),
                "{e}"
            );
            // Signing refuses it too (it would sign with a key others may know).
            let e = write_signed(&plan(), &path, &opts).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_plan(&path, &opts).is_ok());
        // A key of the wrong length.
        std::fs::write(&key, [1u8; 16]).unwrap();
        let e = load_plan(&path, &opts).unwrap_err().to_string();
        assert!(e.contains("is 16 bytes, a key is 32"), "{e}");
    }

    #[test]
    fn unsigned_foreign_and_modified_plans_are_refused_each_with_its_reason() {
        let (d, path, opts) = setup();
        let ours = load_key(opts.home.as_deref().unwrap()).unwrap().unwrap().id();
        // Unsigned.
        let unsigned = d.path().join("unsigned.plan");
        plan().write(&unsigned).unwrap();
        let e = load_plan(&unsigned, &opts).unwrap_err();
        let msg = e.to_string();
        assert_eq!(refusal(e), Refusal::Unsigned);
        for want in [
            "unsigned.plan: refused: the plan is not signed",
            "A plan is native code",
            "tunec trust",
            "--trust-plan",
            "trusted-plans",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
        // Signed with another user's key; and when this user has no key at all.
        let foreign = d.path().join("foreign.plan");
        let other = TrustOptions::in_dir(d.path().join("other"));
        let theirs = write_signed(&plan(), &foreign, &other).unwrap().key_id;
        let e = load_plan(&foreign, &opts).unwrap_err();
        assert!(e.to_string().contains(&format!("signed with another key (id {})", hex(&theirs))), "{e}");
        assert_eq!(refusal(e), Refusal::ForeignKey { found: theirs, ours: Some(ours) });
        let keyless = TrustOptions::in_dir(d.path().join("keyless"));
        let e = load_plan(&foreign, &keyless).unwrap_err();
        assert!(e.to_string().contains("you have no signing key yet"), "{e}");
        assert_eq!(refusal(e), Refusal::ForeignKey { found: theirs, ours: None });
        // One flipped payload byte (and the same with the CRC fixed, as an attacker would): modified.
        let good = std::fs::read(&path).unwrap();
        let end = good.len() - ir::plan::SIGNATURE_BYTES;
        for at in [HEADER_BYTES, (HEADER_BYTES + end) / 2, end - 1] {
            for fix_crc in [false, true] {
                let mut b = good.clone();
                b[at] ^= 0x01;
                if fix_crc {
                    let crc = crc32(&b[HEADER_BYTES..end]);
                    b[20..24].copy_from_slice(&crc.to_le_bytes());
                }
                std::fs::write(&path, &b).unwrap();
                let e = load_plan(&path, &opts).unwrap_err();
                assert!(e.to_string().contains("was modified after it was signed"), "{e}");
                assert_eq!(refusal(e), Refusal::Tampered { key_id: ours });
            }
        }
        // A flipped tag byte, or a key id changed to another: refused too.
        let mut b = good.clone();
        let n = b.len();
        b[n - 1] ^= 0x80;
        std::fs::write(&path, &b).unwrap();
        assert_eq!(refusal(load_plan(&path, &opts).unwrap_err()), Refusal::Tampered { key_id: ours });
        let mut b = good.clone();
        b[end + 8] ^= 1;
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(refusal(load_plan(&path, &opts).unwrap_err()), Refusal::ForeignKey { .. }));
        // A truncated signature block: its own message (the file was cut short), even with --trust-plan.
        std::fs::write(&path, &good[..good.len() - 7]).unwrap();
        let once = TrustOptions { trust_once: true, ..opts.clone() };
        for o in [&opts, &once] {
            let e = load_plan(&path, o).unwrap_err();
            assert!(matches!(e, TrustError::Plan { source: PlanError::SignatureTruncated { found: 41 }, .. }), "{e:?}");
            assert!(e.to_string().contains("p.plan: truncated signature"), "{e}");
        }
    }

    /// CRC-32 (IEEE), as the plan header has it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn trusting_a_digest_or_once_accepts_a_foreign_plan() {
        let (d, _path, opts) = setup();
        let foreign = d.path().join("foreign.plan");
        write_signed(&plan(), &foreign, &TrustOptions::in_dir(d.path().join("other"))).unwrap();
        assert!(load_plan(&foreign, &opts).is_err());
        let once = TrustOptions { trust_once: true, ..opts.clone() };
        assert_eq!(load_plan(&foreign, &once).unwrap().1, Trust::Once);
        // A wrong expected digest trusts nothing.
        let e = trust_file(&foreign, Some(&"ab".repeat(32)), None, &opts).unwrap_err();
        assert!(matches!(e, TrustError::Digest { .. }), "{e:?}");
        assert!(load_plan(&foreign, &opts).is_err());
        let e = trust_file(&foreign, Some("xyz"), None, &opts).unwrap_err();
        assert!(e.to_string().contains("expected 64 hex digits"), "{e}");
        // The right one (or none) records it, once.
        let digest = sha256_hex(&std::fs::read(&foreign).unwrap());
        let t = trust_file(&foreign, Some(&digest), Some("from the build box\nforged line"), &opts).unwrap();
        assert!(!t.already);
        assert_eq!(t.note, "from the build box\\nforged line", "a note cannot start a new entry");
        let t = trust_file(&foreign, None, None, &opts).unwrap();
        assert!(t.already);
        let (_, how) = load_plan(&foreign, &opts).unwrap();
        assert_eq!(how, Trust::Listed { sha256: digest.clone(), note: "from the build box\\nforged line".into() });
        let list = opts.home.as_ref().unwrap().join(TRUST_LIST);
        assert_eq!(std::fs::read_to_string(&list).unwrap().lines().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode(&list), 0o600);
            std::fs::set_permissions(&list, std::fs::Permissions::from_mode(0o622)).unwrap();
            let e = load_plan(&foreign, &opts).unwrap_err().to_string();
            assert!(e.contains("trusted-plans: the trust list has mode 0622") && e.contains("chmod 600"), "{e}");
            std::fs::set_permissions(&list, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        // A malformed line is named.
        std::fs::write(&list, format!("# mine\n{digest} ok\nnot-a-digest \x1b[2J\n")).unwrap();
        let e = load_plan(&foreign, &opts).unwrap_err().to_string();
        assert!(e.contains("trusted-plans: line 3: expected a SHA-256") && e.contains("\\u{1b}[2J"), "{e}");
        // Files that are not plans are not trusted.
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(trust_file(&junk, None, None, &opts), Err(TrustError::Plan { .. })));
    }

    #[test]
    fn the_config_dir_is_tunec_home_then_xdg_then_dot_config() {
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| std::ffi::OsString::from(v))
        }
        let all = [("TUNEC_HOME", "/t"), ("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(config_dir_from(env(&all)).unwrap(), Path::new("/t"));
        assert_eq!(config_dir_from(env(&all[1..])).unwrap(), Path::new("/x/tunec"));
        assert_eq!(config_dir_from(env(&all[2..])).unwrap(), Path::new("/h/.config/tunec"));
        // Empty or relative XDG_CONFIG_HOME is ignored (the XDG spec), an empty TUNEC_HOME too.
        let odd = [("TUNEC_HOME", ""), ("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(config_dir_from(env(&odd)).unwrap(), Path::new("/h/.config/tunec"));
        let e = config_dir_from(env(&[])).unwrap_err().to_string();
        assert!(e.contains("set TUNEC_HOME"), "{e}");
    }

    #[test]
    fn inspect_says_whether_a_plan_is_trusted() {
        let (d, path, opts) = setup();
        let line = describe(&path, &std::fs::read(&path).unwrap(), &opts);
        assert!(line.starts_with("trust: yes, signed with your key (id "), "{line}");
        let unsigned = d.path().join("u.plan");
        plan().write(&unsigned).unwrap();
        let line = describe(&unsigned, &std::fs::read(&unsigned).unwrap(), &opts);
        assert!(line.starts_with("trust: NO, not signed; `tunec run`/`bench` refuse it"), "{line}");
    }
}

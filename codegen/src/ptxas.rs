//! ptxas: find the binary, assemble PTX for one SM, and parse the per-kernel resource report (`-v`): registers,
//! shared/constant memory, stack frame, spill stores and loads.

use std::env;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ptx::MIN_SM;
use crate::CodegenError;

/// Where `scripts/setup.sh` extracts ptxas, relative to the tunec cache (`$TUNEC_CACHE`, default `~/.cache/tunec`).
pub const CACHED_PTXAS: &str = "ptxas/nvidia/cuda_nvcc/bin/ptxas";

/// Resources ptxas reports for one function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// Mangled function name as it appears in the PTX.
    pub name: String,
    /// `true` for a kernel (`.entry`), `false` for a device function (`.func`).
    pub is_entry: bool,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, in bytes.
    pub shared_bytes: u64,
    /// Constant bank 0 (kernel parameters and such), in bytes.
    pub constant_bytes: u64,
    /// Stack frame per thread, in bytes.
    pub stack_frame_bytes: u64,
    /// Bytes spilled to local memory (stores).
    pub spill_store_bytes: u64,
    /// Bytes reloaded from spills (loads).
    pub spill_load_bytes: u64,
    /// Named barriers used.
    pub barriers: u32,
}

impl KernelResources {
    /// Whether ptxas had to spill registers to local memory.
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// What ptxas produced for one PTX module.
#[derive(Debug, Clone, Default)]
pub struct PtxasReport {
    /// The architecture assembled for (e.g. 90 for sm_90).
    pub sm: u32,
    /// One entry per function, in the order ptxas reported them.
    pub kernels: Vec<KernelResources>,
    /// `ptxas warning : ...` lines, verbatim.
    pub warnings: Vec<String>,
    /// The assembled cubin (ELF), loadable with `cuModuleLoadData`.
    pub cubin: Vec<u8>,
}

impl PtxasReport {
    /// The resources of the function called `name`, if ptxas reported it.
    pub fn kernel(&self, name: &str) -> Option<&KernelResources> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

fn executable(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then(|| path.to_path_buf())
}

fn tunec_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("TUNEC_CACHE") {
        return Some(PathBuf::from(dir));
    }
    env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("tunec"))
}

/// Finds ptxas: `$TUNEC_PTXAS`, then the copy `scripts/setup.sh` installs under the tunec cache, then `PATH`.
///
/// A `TUNEC_PTXAS` that does not name an executable file is skipped, not trusted.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(path) = env::var_os("TUNEC_PTXAS").filter(|p| !p.is_empty()) {
        if let Some(found) = executable(Path::new(&path)) {
            return Some(found);
        }
    }
    if let Some(found) = tunec_cache_dir().and_then(|dir| executable(&dir.join(CACHED_PTXAS))) {
        return Some(found);
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path).find_map(|dir| executable(&dir.join("ptxas")))
}

/// Assembles `ptx` for `sm_<sm>` with `ptxas -v` and returns the cubin and the parsed resource report.
pub fn assemble(ptx: &str, sm: u32) -> Result<PtxasReport, CodegenError> {
    if sm < MIN_SM {
        return Err(CodegenError::UnsupportedSm(sm));
    }
    let ptxas = find_ptxas().ok_or(CodegenError::PtxasNotFound)?;
    let dir = tempfile::Builder::new()
        .prefix("tunec-ptxas-")
        .tempdir()
        .map_err(|source| CodegenError::PtxasIo { path: env::temp_dir(), source })?;
    let input = dir.path().join("module.ptx");
    let output = dir.path().join("module.cubin");
    std::fs::File::create(&input)
        .and_then(|mut f| f.write_all(ptx.as_bytes()))
        .map_err(|source| CodegenError::PtxasIo { path: input.clone(), source })?;

    let run = Command::new(&ptxas)
        .arg(format!("-arch=sm_{sm}"))
        .arg("-v")
        .arg("-o")
        .arg(&output)
        .arg(&input)
        .output()
        .map_err(|source| CodegenError::PtxasIo { path: ptxas.clone(), source })?;
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    if !run.status.success() {
        return Err(CodegenError::PtxasFailed { sm, status: run.status.to_string(), stderr });
    }
    let cubin = std::fs::read(&output).map_err(|source| CodegenError::PtxasIo { path: output.clone(), source })?;
    let (kernels, warnings) = parse_report(&stderr);
    Ok(PtxasReport { sm, kernels, warnings, cubin })
}

/// Parses the stderr of `ptxas -v` into per-function resources and warnings.
///
/// The lines we read look like (ptxas 12.9; sm_90 reports no `cmem[0]`):
/// ```text
/// ptxas info    : 0 bytes gmem
/// ptxas info    : Compiling entry function 'tunec_axpy' for 'sm_80'
/// ptxas info    : Function properties for tunec_axpy
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 10 registers, used 0 barriers, 376 bytes cmem[0]
/// ptxas info    : Compile time = 2.660 ms
/// ```
/// Items ptxas adds later (e.g. `4096 bytes smem`) are read when we know them and skipped otherwise.
pub fn parse_report(stderr: &str) -> (Vec<KernelResources>, Vec<String>) {
    let mut kernels: Vec<KernelResources> = Vec::new();
    let mut warnings = Vec::new();
    // Index into `kernels` of the function the following lines describe.
    let mut current: Option<usize> = None;
    let index_of = |kernels: &mut Vec<KernelResources>, name: &str| -> usize {
        match kernels.iter().position(|k| k.name == name) {
            Some(i) => i,
            None => {
                kernels.push(KernelResources { name: name.to_string(), ..Default::default() });
                kernels.len() - 1
            }
        }
    };

    for line in stderr.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("ptxas warning") {
            warnings.push(trimmed.to_string());
            continue;
        }
        let info = match trimmed.strip_prefix("ptxas info") {
            Some(rest) => rest.trim_start().trim_start_matches(':').trim(),
            None => {
                // Continuation line: "N bytes stack frame, N bytes spill stores, N bytes spill loads".
                if let Some(i) = current {
                    apply_counts(&mut kernels[i], trimmed);
                }
                continue;
            }
        };
        if let Some(rest) = info.strip_prefix("Compiling entry function") {
            if let Some(name) = quoted(rest) {
                let i = index_of(&mut kernels, name);
                kernels[i].is_entry = true;
                current = Some(i);
            }
        } else if let Some(rest) = info.strip_prefix("Function properties for") {
            let name = rest.trim();
            let i = index_of(&mut kernels, name);
            current = Some(i);
        } else if info.starts_with("Used ") {
            if let Some(i) = current {
                apply_counts(&mut kernels[i], info);
            }
        }
    }
    (kernels, warnings)
}

fn quoted(text: &str) -> Option<&str> {
    let start = text.find('\'')? + 1;
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

/// Reads comma-separated "N unit" items ("Used 10 registers", "380 bytes cmem[0]", "used 0 barriers", ...).
fn apply_counts(k: &mut KernelResources, text: &str) {
    for item in text.split(',') {
        let words: Vec<&str> = item.split_whitespace().collect();
        let (number, unit) = match words.as_slice() {
            [verb, n, rest @ ..] if verb.eq_ignore_ascii_case("used") => (*n, rest.join(" ")),
            [n, rest @ ..] => (*n, rest.join(" ")),
            [] => continue,
        };
        let Ok(n) = number.parse::<u64>() else { continue };
        match unit.as_str() {
            "registers" | "register" => k.registers = n as u32,
            "barriers" | "barrier" => k.barriers = n as u32,
            "bytes smem" => k.shared_bytes = n,
            "bytes cmem[0]" => k.constant_bytes = n,
            "bytes stack frame" => k.stack_frame_bytes = n,
            "bytes spill stores" => k.spill_store_bytes = n,
            "bytes spill loads" => k.spill_load_bytes = n,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inkwell::context::Context;
    use kernels::{emit_axpy_kernel, AXPY_KERNEL_NAME};

    /// ptxas is part of the toolchain: its absence fails the suite unless explicitly allowed.
    fn require_ptxas() -> bool {
        if find_ptxas().is_some() {
            return true;
        }
        if env::var("TUNEC_ALLOW_NO_PTXAS").as_deref() == Ok("1") {
            eprintln!("ptxas not found; skipping because TUNEC_ALLOW_NO_PTXAS=1");
            return false;
        }
        panic!(
            "ptxas not found (TUNEC_PTXAS, ~/.cache/tunec/{CACHED_PTXAS}, PATH): run scripts/setup.sh, or set \
             TUNEC_ALLOW_NO_PTXAS=1 to skip the ptxas tests"
        );
    }

    #[test]
    fn parses_a_report_with_spills_and_device_functions() {
        let stderr = "\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'gemm' for 'sm_90'
ptxas info    : Function properties for gemm
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 49152 bytes smem, 400 bytes cmem[0]
ptxas warning : Registers are spilled to local memory in function 'gemm', 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Compile time = 4.188 ms
ptxas info    : Compiling entry function 'axpy' for 'sm_90'
ptxas info    : Function properties for axpy
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, 380 bytes cmem[0]
";
        let (kernels, warnings) = parse_report(stderr);
        assert_eq!(kernels.len(), 3);
        let helper = &kernels[0];
        assert_eq!((helper.name.as_str(), helper.is_entry, helper.stack_frame_bytes), ("helper", false, 8));
        let gemm = &kernels[1];
        assert_eq!(
            gemm,
            &KernelResources {
                name: "gemm".into(),
                is_entry: true,
                registers: 255,
                shared_bytes: 49152,
                constant_bytes: 400,
                stack_frame_bytes: 24,
                spill_store_bytes: 16,
                spill_load_bytes: 12,
                barriers: 1,
            }
        );
        assert!(gemm.spills());
        let axpy = &kernels[2];
        assert_eq!((axpy.registers, axpy.constant_bytes, axpy.shared_bytes), (8, 380, 0));
        assert!(!axpy.spills());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("spilled"));
    }

    #[test]
    fn axpy_assembles_for_sm80_and_sm90() {
        if !require_ptxas() {
            return;
        }
        for sm in [80, 90] {
            let ctx = Context::create();
            let module = ctx.create_module("axpy");
            emit_axpy_kernel(&ctx, &module).expect("emit axpy");
            let ptx = crate::ptx::emit_ptx(&module, sm).expect("emit PTX");
            let report = assemble(&ptx, sm).unwrap_or_else(|e| panic!("sm_{sm}: {e}\n{ptx}"));
            assert_eq!(report.sm, sm);
            let axpy = report.kernel(AXPY_KERNEL_NAME).unwrap_or_else(|| panic!("sm_{sm}: {report:?}"));
            assert!(axpy.is_entry, "sm_{sm}: {axpy:?}");
            assert!(axpy.registers > 0 && axpy.registers < 64, "sm_{sm}: {axpy:?}");
            assert!(!axpy.spills(), "sm_{sm}: {axpy:?}");
            if sm == 80 {
                // sm_80 reports the parameter bank as cmem[0]; ptxas 12.9 prints no cmem for sm_90.
                assert!(axpy.constant_bytes > 0, "sm_{sm}: parameters live in cmem[0]: {axpy:?}");
            }
            assert_eq!(&report.cubin[..4], b"\x7fELF", "sm_{sm}: cubin is not an ELF file");
        }
    }

    #[test]
    fn ptxas_rejects_bad_ptx_with_its_message() {
        if !require_ptxas() {
            return;
        }
        let bad = ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() { bogus.instruction; }\n";
        match assemble(bad, 80) {
            Err(CodegenError::PtxasFailed { sm: 80, stderr, .. }) => assert!(stderr.contains("error"), "{stderr}"),
            other => panic!("expected PtxasFailed, got {other:?}"),
        }
    }
}

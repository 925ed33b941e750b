//! Packing the guest's initramfs: busybox, kernel modules, test programs, `/init`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps::Kernel;
use crate::error::{io_err, Result, XtaskError};

/// Stock modules every guest loads (with their dependencies, in order).
pub const BASE_MODULES: &[&str] = &[
    "dm-mod",
    "dm-bufio",
    "dm-snapshot",
    "loop",
    "virtio_pci",
    "virtio_blk",
];

/// Everything that goes into one initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Stock module names to load (dependencies are added).
    pub modules: Vec<String>,
    /// Extra `.ko` files loaded after the stock ones (e.g. our dm-user.ko).
    pub extra_modules: Vec<PathBuf>,
    /// Files copied to `/bin` in the guest.
    pub binaries: Vec<PathBuf>,
    /// Shell text run by `/init` after the modules are loaded.
    pub init_fragment: String,
}

/// Name of a module file without directory and `.ko[.xz|.zst]` suffix, with `_` for `-`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// Parse `modules.dep` into name -> (relative path, dependency paths).
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(str::to_string).collect();
        out.insert(module_name(path), (path.to_string(), deps));
    }
    out
}

/// Resolve `wanted` into an ordered list of module paths (dependencies first).
/// Built-in modules are skipped; unknown ones are an error.
pub fn resolve_modules(kernel: &Kernel, wanted: &[String]) -> Result<Vec<PathBuf>> {
    let dep_path = kernel.modules_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(io_err("read", &dep_path))?;
    let builtin_path = kernel.modules_dir.join("modules.builtin");
    let builtin: BTreeSet<String> = std::fs::read_to_string(&builtin_path)
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let deps = parse_modules_dep(&dep_text);
    let by_path: BTreeMap<&str, &Vec<String>> =
        deps.values().map(|(p, d)| (p.as_str(), d)).collect();
    let mut order: Vec<String> = Vec::new();
    fn visit(
        path: &str,
        by_path: &BTreeMap<&str, &Vec<String>>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if order.iter().any(|p| p == path) || depth > 64 {
            return;
        }
        if let Some(ds) = by_path.get(path) {
            // modules.dep lists the deepest dependency last.
            for d in ds.iter().rev() {
                visit(d, by_path, order, depth + 1);
            }
        }
        order.push(path.to_string());
    }
    for name in wanted {
        let key = name.replace('-', "_");
        match deps.get(&key) {
            Some((path, _)) => visit(path, &by_path, &mut order, 0),
            None if builtin.contains(&key) => {}
            None => {
                return Err(XtaskError::Resolve {
                    what: format!("module {name} for {}", kernel.abi),
                    why: format!("not in {} nor built in", dep_path.display()),
                })
            }
        }
    }
    Ok(order
        .into_iter()
        .map(|p| kernel.modules_dir.join(p))
        .collect())
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(io_err("write", path))
}

fn set_exec(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", path))
}

/// Copy a module into `dir`, decompressing `.xz`/`.zst`. Returns the guest file name.
fn stage_module(src: &Path, dir: &Path) -> Result<String> {
    let name = module_name(&src.to_string_lossy());
    let dst = dir.join(format!("{name}.ko"));
    let s = src.to_string_lossy();
    if s.ends_with(".ko.xz") || s.ends_with(".ko.zst") {
        let tool = if s.ends_with(".xz") { "xz" } else { "zstd" };
        let out = Command::new(tool)
            .args(["-d", "-c"])
            .arg(src)
            .output()
            .map_err(|source| XtaskError::Spawn {
                cmd: format!("{tool} -d -c {s}"),
                source,
            })?;
        if !out.status.success() {
            return Err(XtaskError::Command {
                cmd: format!("{tool} -d -c {s}"),
                status: out.status,
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        write_file(&dst, &out.stdout)?;
    } else {
        std::fs::copy(src, &dst).map_err(io_err("copy", src))?;
    }
    Ok(name)
}

/// The `/init` script: mounts, module loading, the spec's fragment, power-off.
pub fn init_script(module_names: &[String], extra_names: &[String], fragment: &str) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin:/sbin\n\
         mkdir -p /proc /sys /dev /tmp /run\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         echo \"VMINFO kernel $(uname -r)\"\n",
    );
    for m in module_names {
        s.push_str(&format!(
            "insmod /lib/modules/{m}.ko || echo \"VMTEST insmod-{m} FAIL insmod returned $?\"\n"
        ));
    }
    for m in extra_names {
        s.push_str(&format!(
            "if insmod /lib/modules/{m}.ko; then echo \"VMTEST insmod-{m} PASS\"; \
             else echo \"VMTEST insmod-{m} FAIL insmod returned $?\"; fi\n"
        ));
    }
    s.push_str("echo \"VMINFO disks: $(ls /dev/vd* 2>/dev/null | tr '\\n' ' ')\"\n");
    s.push_str(fragment);
    s.push_str("\necho VMDONE\nsync\npoweroff -f\n");
    s
}

/// Build `build_root/<label>/initramfs.cpio` for `kernel`; returns its path.
pub fn pack(
    build_root: &Path,
    label: &str,
    kernel: &Kernel,
    spec: &InitramfsSpec,
) -> Result<PathBuf> {
    let work = build_root.join(format!("initramfs-{label}"));
    let root = work.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(io_err("remove", &root))?;
    }
    for d in [
        "bin",
        "sbin",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(io_err("create", &p))?;
    }
    let busybox = which("busybox")?;
    std::fs::copy(&busybox, root.join("bin/busybox")).map_err(io_err("copy", &busybox))?;
    set_exec(&root.join("bin/busybox"))?;
    let modules_dir = root.join("lib/modules");
    let mut names = Vec::new();
    for m in resolve_modules(kernel, &spec.modules)? {
        names.push(stage_module(&m, &modules_dir)?);
    }
    let mut extra = Vec::new();
    for m in &spec.extra_modules {
        extra.push(stage_module(m, &modules_dir)?);
    }
    for b in &spec.binaries {
        let file = b
            .file_name()
            .ok_or_else(|| XtaskError::Usage(format!("bad binary path {}", b.display())))?;
        let dst = root.join("bin").join(file);
        std::fs::copy(b, &dst).map_err(io_err("copy", b))?;
        set_exec(&dst)?;
    }
    let init = root.join("init");
    write_file(
        &init,
        init_script(&names, &extra, &spec.init_fragment).as_bytes(),
    )?;
    set_exec(&init)?;
    let cpio = work.join("initramfs.cpio");
    let mut c = Command::new("sh");
    c.current_dir(&root).arg("-c").arg(format!(
        "find . | cpio -o -H newc --quiet -R 0:0 > '{}'",
        cpio.display()
    ));
    crate::cmd::output(&mut c)?;
    Ok(cpio)
}

/// Locate a program on PATH.
pub fn which(prog: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/bin"), PathBuf::from("/usr/bin")])
    {
        let p = dir.join(prog);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(XtaskError::Resolve {
        what: prog.into(),
        why: "not found on PATH".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(module_name("kernel/drivers/md/dm-mod.ko.xz"), "dm_mod");
        assert_eq!(module_name("kernel/drivers/block/loop.ko"), "loop");
    }

    #[test]
    fn modules_dep_parses_dependencies() {
        let deps = parse_modules_dep(
            "kernel/drivers/md/dm-snapshot.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko\n\
             kernel/drivers/md/dm-mod.ko:\n",
        );
        assert_eq!(deps["dm_snapshot"].1.len(), 2);
        assert!(deps["dm_mod"].1.is_empty());
    }

    #[test]
    fn init_script_loads_in_order_and_powers_off() {
        let s = init_script(
            &["dm_mod".into(), "dm_bufio".into()],
            &["dm_user".into()],
            "echo hi",
        );
        let a = s.find("dm_mod.ko").unwrap();
        let b = s.find("dm_bufio.ko").unwrap();
        let c = s.find("dm_user.ko").unwrap();
        assert!(a < b && b < c);
        assert!(s.trim_end().ends_with("poweroff -f"));
    }
}

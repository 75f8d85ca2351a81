//! The CDI module against real specs (tests/cdi: NVIDIA's, AMD's, Intel's shapes) and the
//! CDI rules, all without root.

use super::*;
use file::flow_depth;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cdi")
}

fn registry() -> Registry {
    Registry::load(&[fixtures().join("etc-cdi"), fixtures().join("var-run-cdi"), fixtures().join("missing")])
}

fn spec(name: &str, text: &str) -> Result<Spec, String> {
    parse_spec(Path::new(name), text).map_err(|e| e.to_string())
}

fn node_paths(e: &ContainerEdits) -> Vec<String> {
    e.device_nodes.iter().map(|n| n.path.display().to_string()).collect()
}

const UUID: &str = "GPU-3a6b1f1e-8c1d-4b9a-9f57-0e2d7c5b4a11";

#[test]
fn good_specs_load_beside_broken_ones() {
    let r = registry();
    let kinds: Vec<&str> = r.specs.iter().map(|s| s.kind.as_str()).collect();
    for k in ["nvidia.com/gpu", "amd.com/gpu", "intel.com/gpu"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}; problems: {:?}", r.problems);
    }
    let problem = |file: &str| r.problems.iter().find(|p| p.contains(file)).cloned();
    let broken = problem("broken.json").expect("broken.json reported");
    assert!(broken.starts_with(&fixtures().join("etc-cdi/broken.json").display().to_string()), "{broken}");
    assert!(broken.contains("JSON"), "{broken}");
    let old = problem("old-version.yaml").expect("old-version.yaml reported");
    assert!(old.contains("unsupported cdiVersion \"0.2.0\""), "{old}");
    let kind = problem("bad-kind.json").expect("bad-kind.json reported");
    assert!(kind.contains("invalid kind"), "{kind}");
    assert!(!r.problems.iter().any(|p| p.contains("README") || p.contains("subdir")), "{:?}", r.problems);
    assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
}

#[test]
fn devices_lists_each_qualified_name_once() {
    let r = registry();
    let names: Vec<String> = r.devices().into_iter().map(|(q, _, _)| q).collect();
    for want in [
        "nvidia.com/gpu=0",
        &format!("nvidia.com/gpu={UUID}"),
        "nvidia.com/gpu=all",
        "amd.com/gpu=0",
        "amd.com/gpu=all",
    ] {
        assert_eq!(names.iter().filter(|n| *n == want).count(), 1, "{want} in {names:?}");
    }
    assert!(names.contains(&"intel.com/gpu=0000-00-02-0-0x46a6".to_owned()), "{names:?}");
}

#[test]
fn later_directory_overrides_earlier() {
    let r = registry();
    let got = r.resolve("nvidia.com/gpu", "0").unwrap();
    assert_eq!(got.len(), 1);
    assert!(got[0].spec.path.starts_with(fixtures().join("var-run-cdi")), "{}", got[0].spec.path.display());
    let e = got[0].edits();
    let n0 = e.device_nodes.iter().find(|n| n.path == Path::new("/dev/nvidia0")).unwrap();
    // major alone, as nvidia-ctk writes minor 0
    assert_eq!((n0.major, n0.minor, n0.file_mode), (Some(195), Some(0), Some(0o666)));
    assert_eq!(e.additional_gids, vec![39]);
    assert!(e.env.contains(&("NVIDIA_CTK_LIBCUDA_DIR".into(), "/usr/lib/x86_64-linux-gnu".into())), "{:?}", e.env);
    // the other devices still come from /etc/cdi
    let uuid = r.resolve("nvidia.com/gpu", UUID).unwrap();
    assert!(uuid[0].spec.path.starts_with(fixtures().join("etc-cdi")));
}

#[test]
fn nvidia_device_gets_spec_level_edits() {
    let r = registry();
    let got = r.resolve("nvidia.com/gpu", UUID).unwrap();
    assert_eq!(got[0].qualified, format!("nvidia.com/gpu={UUID}"));
    let e = got[0].edits();
    assert_eq!(
        node_paths(&e),
        ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/nvidia0"]
    );
    let ctl = &e.device_nodes[0];
    assert_eq!(ctl.host_path, Path::new("/dev/nvidiactl"));
    assert_eq!((ctl.kind, ctl.major, ctl.minor, ctl.permissions.as_deref()), (None, None, None, None));
    assert_eq!(e.env, vec![("NVIDIA_VISIBLE_DEVICES".to_owned(), "void".to_owned())]);
    assert!(e.mounts.iter().any(|m| m.container_path.to_string_lossy().contains("libcuda.so.")), "{:?}", e.mounts);
    let m = &e.mounts[0];
    assert_eq!(m.options, ["ro", "nosuid", "nodev", "bind"]);
    assert_eq!(e.hooks.len(), 2);
    assert!(e.hooks.iter().all(|h| h.hook_name == "createContainer" && h.path == Path::new("/usr/bin/nvidia-ctk")));
    assert_eq!(e.hooks[0].args[..3], ["nvidia-ctk", "hook", "create-symlinks"]);
    assert_eq!(e.hooks[1].args[..3], ["nvidia-ctk", "hook", "update-ldcache"]);
    assert!(e.unsupported.is_empty());
}

#[test]
fn all_means_the_vendors_all_device_when_there_is_one() {
    let r = registry();
    let got = r.resolve("nvidia.com/gpu", "all").unwrap();
    assert_eq!(got.iter().map(|d| d.qualified.as_str()).collect::<Vec<_>>(), ["nvidia.com/gpu=all"]);
    let paths = node_paths(&got[0].edits());
    for p in ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] {
        assert!(paths.contains(&p.to_owned()), "{p} in {paths:?}");
    }
}

#[test]
fn all_means_every_device_when_the_spec_has_no_all() {
    let r = registry();
    let got = r.resolve("intel.com/gpu", "all").unwrap();
    let names: Vec<&str> = got.iter().map(|d| d.device.name.as_str()).collect();
    assert_eq!(names, ["0000-00-02-0-0x46a6", "0000-03-00-0-0x56a0"]);
    let e = combined_edits(&got);
    assert_eq!(node_paths(&e), ["/dev/dri/card0", "/dev/dri/renderD128", "/dev/dri/card1", "/dev/dri/renderD129"]);
    assert_eq!(e.device_nodes[0].kind, Some('c'));
    assert_eq!(e.mounts[0].kind.as_deref(), Some("none"));
    assert_eq!(e.mounts[0].options, ["bind", "rw"]);
}

#[test]
fn amd_json_spec() {
    let r = registry();
    let got = r.resolve("amd.com/gpu", "0").unwrap();
    let e = got[0].edits();
    assert_eq!(node_paths(&e), ["/dev/dri/card1", "/dev/dri/renderD128", "/dev/kfd"]);
    let render = &e.device_nodes[1];
    assert_eq!(render.kind, Some('c'));
    assert_eq!((render.major, render.minor), (Some(226), Some(128)));
    assert_eq!((render.file_mode, render.uid, render.gid), (Some(0o660), Some(0), Some(109)));
    assert_eq!(render.permissions.as_deref(), Some("rwm"));
    let kfd = &e.device_nodes[2];
    assert_eq!((kfd.major, kfd.minor), (Some(235), Some(0)));
    assert!(e.env.is_empty() && e.mounts.is_empty() && e.hooks.is_empty());
}

#[test]
fn unknown_device_lists_what_exists() {
    let r = registry();
    let e = r.resolve("nvidia.com/gpu", "7").unwrap_err().to_string();
    assert!(e.contains("nvidia.com/gpu=7"), "{e}");
    for have in ["0", UUID, "all"] {
        assert!(e.contains(have), "{have} in {e}");
    }
    assert!(!e.contains("amd.com"), "{e}");
    let e = r.resolve("example.com/fpga", "0").unwrap_err().to_string();
    assert!(e.contains("no CDI spec provides kind example.com/fpga"), "{e}");
    assert!(e.contains("amd.com/gpu=0") && e.contains("nvidia.com/gpu=all"), "{e}");
    assert!(e.contains("broken.json"), "{e}");
    assert!(r.resolve("nvidia.com", "0").unwrap_err().to_string().contains("invalid CDI device"));
    assert!(r.resolve("nvidia.com/gpu", "-0").unwrap_err().to_string().contains("invalid CDI device"));
    let empty = Registry::default();
    assert!(empty.resolve("nvidia.com/gpu", "all").unwrap_err().to_string().contains("no CDI devices at all"));
}

#[test]
fn versions() {
    let body = |v: &str| {
        format!("cdiVersion: {v}\nkind: vendor.com/dev\ndevices:\n- name: a\n  containerEdits:\n    env: [A=1]\n")
    };
    for v in ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "\"1.1.0\"", "v0.6.0"] {
        assert!(spec("/x/v.yaml", &body(v)).is_ok(), "{v}");
    }
    for v in ["0.1.0", "0.2.0", "0.9.0", "2.0.0", "1.0"] {
        let e = spec("/x/v.yaml", &body(v)).unwrap_err().to_string();
        assert!(e.starts_with("/x/v.yaml: unsupported cdiVersion"), "{e}");
    }
    assert!(spec("/x/v.json", r#"{"kind":"a.com/b","devices":[]}"#)
        .unwrap_err()
        .to_string()
        .contains("cdiVersion is missing"));
}

#[test]
fn kind_syntax() {
    for k in ["vendor.com/foo", "foo.bar.baz/foo-bar123.B_az", "a/b", "nvidia.com/gpu"] {
        assert!(validate_kind(k).is_ok(), "{k}");
    }
    for k in [
        "foo",
        "vendor.com/foo/",
        "vendor.com/foo/bar",
        "/foo",
        "vendor.com/",
        "1vendor/foo",
        "vendor-/foo",
        "ven dor/foo",
    ] {
        assert!(validate_kind(k).is_err(), "{k}");
    }
    let e =
        spec("/x/k.json", r#"{"cdiVersion":"0.6.0","kind":"nvidia.com/gpu/x","devices":[]}"#).unwrap_err().to_string();
    assert!(e.starts_with("/x/k.json: invalid kind"), "{e}");
}

#[test]
fn device_name_syntax() {
    for n in ["0", "a", "all", UUID, "MIG-1:0", "0000-00-02-0-0x46a6", "gpu_0.1"] {
        assert!(validate_device_name(n).is_ok(), "{n}");
    }
    for n in ["", "-0", "0-", "a b", "a/b", "a=b", ":x"] {
        assert!(validate_device_name(n).is_err(), "{n}");
    }
    let e =
        spec("/x/n.yaml", "cdiVersion: 0.5.0\nkind: a.com/b\ndevices:\n- name: bad name\n").unwrap_err().to_string();
    assert!(e.contains("device \"bad name\""), "{e}");
    let e = spec("/x/n.yaml", "cdiVersion: 0.5.0\nkind: a.com/b\ndevices:\n- name: x\n- name: x\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("defined twice"), "{e}");
}

/// The audit's attacks: paths that lead out of the root, a spec nested 100 000 deep.
#[test]
fn paths_stay_in_the_root_and_specs_are_bounded() {
    let bad = |edits: &str| {
        spec("x.yaml", &format!("cdiVersion: 0.6.0\nkind: a.com/b\ndevices: [{{name: d, containerEdits: {edits}}}]\n"))
            .unwrap_err()
    };
    assert!(bad("{mounts: [{hostPath: /a, containerPath: /../../etc/x}]}")
        .contains("containerPath \"/../../etc/x\" contains '..'"));
    assert!(bad("{mounts: [{hostPath: /a, containerPath: relative}]}").contains("is not absolute"));
    assert!(bad("{deviceNodes: [{path: /dev/../../x}]}").contains("path \"/dev/../../x\" contains '..'"));
    let deep = format!("cdiVersion: 0.6.0\nkind: a.com/b\ndevices: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let t = std::time::Instant::now();
    assert!(spec("x.yaml", &deep).unwrap_err().to_string().contains("nested deeper than 32 levels"));
    assert!(t.elapsed() < std::time::Duration::from_millis(100), "{:?}", t.elapsed());
    assert!(spec("x.yaml", &" ".repeat(2 << 20)).unwrap_err().to_string().contains("larger than"));
    // Brackets in quoted strings are text.
    assert_eq!(flow_depth(r#"a: "[[[[" b: '{{{' c: [ {d: 1} ]"#), 2);
}

#[test]
fn yaml_leniency_and_field_checks() {
    // bare number as a name, octal file mode as YAML 1.1 writes it, unknown fields, nulls
    let s = spec(
        "/x/l.yaml",
        "cdiVersion: 0.6.0\nkind: a.com/b\nfuture: {x: 1}\ncontainerEdits: null\nannotations: {k: v}\n\
         devices:\n- name: 0\n  somethingNew: true\n  containerEdits:\n    deviceNodes:\n    - path: /dev/x\n      fileMode: 0666\n      type: b\n",
    )
    .unwrap();
    assert_eq!(s.devices[0].name, "0");
    assert_eq!(s.devices[0].edits.device_nodes[0].file_mode, Some(0o666));
    assert_eq!(s.devices[0].edits.device_nodes[0].kind, Some('b'));
    let bad = |edits: &str| {
        spec(
            "/x/f.json",
            &format!(
                r#"{{"cdiVersion":"0.6.0","kind":"a.com/b","devices":[{{"name":"d","containerEdits":{edits}}}]}}"#
            ),
        )
        .unwrap_err()
    };
    assert!(bad(r#"{"env":["NOEQUALS"]}"#).contains("invalid environment variable"));
    assert!(bad(r#"{"deviceNodes":[{"path":"/dev/x","type":"x"}]}"#).contains("invalid type"));
    assert!(bad(r#"{"deviceNodes":[{"path":"/dev/x","permissions":"rwx"}]}"#).contains("invalid permissions"));
    assert!(bad(r#"{"deviceNodes":[{"hostPath":"/dev/x"}]}"#).contains("path is missing"));
    assert!(bad(r#"{"mounts":[{"hostPath":"/a"}]}"#).contains("containerPath is missing"));
    assert!(bad(r#"{"hooks":[{"hookName":"preStart","path":"/bin/true"}]}"#).contains("invalid hookName"));
    assert!(bad(r#"{"hooks":[{"hookName":"poststop","path":"true"}]}"#).contains("not absolute"));
    assert!(bad(r#"{"hooks":[{"hookName":"poststop","path":"/bin/true","timeout":0}]}"#).contains("greater than zero"));
    assert!(bad(r#"{"deviceNodes":[{"path":"/dev/x","major":-1}]}"#).contains("invalid major"));
}

#[test]
fn unsupported_edits_fail_only_the_devices_that_use_them() {
    let s = spec(
        "/x/u.yaml",
        "cdiVersion: 1.1.0\nkind: a.com/b\ndevices:\n\
         - name: plain\n  containerEdits:\n    env: [A=1]\n    additionalGIDs: [0, 44]\n\
         - name: rdt\n  containerEdits:\n    intelRdt: {closID: c1}\n\
         - name: net\n  containerEdits:\n    netDevices: [{hostInterfaceName: eth1, name: net0}]\n",
    )
    .unwrap();
    let r = Registry { specs: vec![s], problems: vec![] };
    let plain = r.resolve("a.com/b", "plain").unwrap();
    assert_eq!(plain[0].edits().additional_gids, vec![44]);
    let e = r.resolve("a.com/b", "rdt").unwrap_err().to_string();
    assert!(e.contains("a.com/b=rdt") && e.contains("intelRdt") && e.contains("not support"), "{e}");
    let e = r.resolve("a.com/b", "net").unwrap_err().to_string();
    assert!(e.contains("netDevices"), "{e}");
    assert!(r.resolve("a.com/b", "all").is_err());
}

#[test]
fn merge_follows_cdi() {
    let s = spec(
        "/x/m.yaml",
        "cdiVersion: 0.5.0\nkind: a.com/b\n\
         containerEdits:\n  env: [A=spec, B=spec]\n  deviceNodes: [{path: /dev/ctl}, {path: /dev/x, permissions: r}]\n\
         \x20 mounts: [{hostPath: /h/lib/a, containerPath: /usr/lib/a}, {hostPath: /h1, containerPath: /opt}]\n\
         \x20 hooks: [{hookName: createContainer, path: /bin/true}]\n\
         devices:\n- name: d1\n  containerEdits:\n    env: [A=dev]\n    deviceNodes: [{path: /dev/x, permissions: rw}]\n\
         \x20   mounts: [{hostPath: /h2, containerPath: /opt}]\n\
         - name: d2\n  containerEdits:\n    deviceNodes: [{path: /dev/y}]\n",
    )
    .unwrap();
    let r = Registry { specs: vec![s], problems: vec![] };
    let d1 = r.resolve("a.com/b", "d1").unwrap();
    let e = d1[0].edits();
    assert_eq!(e.env, [("B".to_owned(), "spec".to_owned()), ("A".to_owned(), "dev".to_owned())]);
    assert_eq!(node_paths(&e), ["/dev/ctl", "/dev/x"]);
    assert_eq!(e.device_nodes[1].permissions.as_deref(), Some("rw"));
    let mounts: Vec<(&Path, &Path)> =
        e.mounts.iter().map(|m| (m.container_path.as_path(), m.host_path.as_path())).collect();
    assert_eq!(mounts, [(Path::new("/opt"), Path::new("/h2")), (Path::new("/usr/lib/a"), Path::new("/h/lib/a"))]);
    let all = r.resolve("a.com/b", "all").unwrap();
    assert_eq!(all.len(), 2);
    let both = combined_edits(&all);
    assert_eq!(both.hooks.len(), 1, "spec-level hooks once");
    assert_eq!(node_paths(&both), ["/dev/ctl", "/dev/x", "/dev/y"]);
    assert_eq!(all.iter().map(|d| d.edits().hooks.len()).sum::<usize>(), 2, "each device alone gets them");
}

#[test]
fn same_directory_conflict_drops_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let (low, high) = (tmp.path().join("low"), tmp.path().join("high"));
    std::fs::create_dir_all(&low).unwrap();
    std::fs::create_dir_all(&high).unwrap();
    let body = |dev: &str, node: &str| {
        format!(
            r#"{{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{{"name":"{dev}","containerEdits":{{"deviceNodes":[{{"path":"{node}"}}]}}}}]}}"#
        )
    };
    std::fs::write(low.join("1.json"), body("x", "/dev/one")).unwrap();
    std::fs::write(low.join("2.json"), body("x", "/dev/two")).unwrap();
    std::fs::write(low.join("3.json"), body("y", "/dev/y1")).unwrap();
    std::fs::write(low.join("4.json"), body("y", "/dev/y2")).unwrap();
    std::fs::write(high.join("5.json"), body("y", "/dev/y3")).unwrap();
    let r = Registry::load(&[low.clone(), high]);
    let e = r.resolve("a.com/b", "x").unwrap_err().to_string();
    assert!(e.contains("a.com/b has: y"), "{e}");
    assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    assert!(r.problems.iter().all(|p| p.contains("a.com/b=x") && p.contains("1.json") && p.contains("2.json")));
    // a higher directory settles a conflict below it
    let y = r.resolve("a.com/b", "y").unwrap();
    assert_eq!(node_paths(&y[0].edits()), ["/dev/y3"]);
}

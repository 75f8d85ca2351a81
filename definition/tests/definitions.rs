//! The definition format end to end: files in search paths → a typed definition or an error
//! that names file, line, section and key.

use gpubox_definition::*;
use std::fs;
use std::path::{Path, PathBuf};

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        Tree { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn write(&self, rel: &str, text: &str) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        self
    }
    fn search(&self, dirs: &[&str]) -> SearchPath {
        SearchPath(dirs.iter().map(|d| self.path(d)).collect())
    }
    fn load(&self, text: &str) -> Result<Definition, Error> {
        self.write("etc/job.gpubox", text);
        self.search(&["etc"]).load("job")
    }
    fn error(&self, text: &str) -> String {
        self.load(text).unwrap_err().to_string().replace(&self.dir.path().display().to_string(), "")
    }
}

const MINIMAL: &str = "[Container]\nExec=/bin/true\n";

#[test]
fn defaults_are_least_privilege() {
    let d = Tree::new().load(MINIMAL).unwrap();
    let c = &d.container;
    assert_eq!(c.exec, ["/bin/true"]);
    assert_eq!(c.root_directory, None);
    assert_eq!(c.hostname, "job");
    assert_eq!(c.user_namespace, UserNamespace::Private);
    assert_eq!(c.network, Network::None);
    assert_eq!(c.seccomp, Seccomp::Default);
    assert!(c.no_new_privileges);
    assert!(!c.init);
    assert!(d.gpu.devices.is_empty() && !d.gpu.hotplug && !d.gpu.optional && !d.gpu.driver_libraries);
}

#[test]
fn every_key_parses() {
    let d = Tree::new()
        .load(
            r#"
[Unit]
Description=Training %i
After=network-online.target

[Container]
RootDirectory=/var/lib/machines/%i
Exec=/usr/bin/python3 -c "print('hello world')" \
     --flag
WorkingDirectory=/work
Environment=A=1 "B=two words"
Environment=C=%n
User=1000:100
Hostname=trainer-1
UserNamespace=host
Network=host
ReadOnly=yes
Bind=/srv/data:/data -/srv/maybe
BindReadOnly=/opt/models
AddCapability=sys_nice CAP_IPC_LOCK
DropCapability=all
Seccomp=/etc/gpubox/seccomp.json
NoNewPrivileges=no
Init=on

[GPU]
Device=nvidia:0 pci:01:00.0
Device=cdi:nvidia.com/gpu=1
Optional=true
Hotplug=1
DriverLibraries=yes

[Service]
MemoryMax=64G
Restart=on-failure

[Install]
WantedBy=multi-user.target
RequiredBy=train.target
"#,
        )
        .unwrap();
    let c = &d.container;
    assert_eq!(c.root_directory.as_deref(), Some(Path::new("/var/lib/machines/job")));
    assert_eq!(c.exec, ["/usr/bin/python3", "-c", "print('hello world')", "--flag"]);
    assert_eq!(c.working_directory.as_deref(), Some(Path::new("/work")));
    let env: Vec<(&str, &str)> = c.environment.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(env, [("A", "1"), ("B", "two words"), ("C", "gpu@job.service")]);
    assert_eq!(c.user, Some(User::Id { uid: 1000, gid: Some(100) }));
    assert_eq!(c.hostname, "trainer-1");
    assert_eq!(c.user_namespace, UserNamespace::Host);
    assert_eq!(c.network, Network::Host);
    assert!(c.read_only);
    assert_eq!(
        c.binds,
        [
            Bind {
                source: "/srv/data".into(),
                destination: "/data".into(),
                read_only: false,
                optional: false,
                idmap: false
            },
            Bind {
                source: "/srv/maybe".into(),
                destination: "/srv/maybe".into(),
                read_only: false,
                optional: true,
                idmap: false
            },
            Bind {
                source: "/opt/models".into(),
                destination: "/opt/models".into(),
                read_only: true,
                optional: false,
                idmap: false
            },
        ]
    );
    assert_eq!(c.add_capabilities, ["CAP_SYS_NICE", "CAP_IPC_LOCK"]);
    assert_eq!(c.drop_capabilities, ["ALL"]);
    assert_eq!(c.seccomp, Seccomp::Profile("/etc/gpubox/seccomp.json".into()));
    assert!(!c.no_new_privileges);
    assert!(c.init);
    let devices: Vec<String> = d.gpu.devices.iter().map(|s| s.to_string()).collect();
    assert_eq!(devices, ["nvidia:0", "pci:0000:01:00.0", "cdi:nvidia.com/gpu=1"]);
    assert!(d.gpu.optional && d.gpu.hotplug && d.gpu.driver_libraries);
    // Pass-through keeps systemd's own specifiers for systemd to expand.
    assert_eq!((d.unit[0].key.as_str(), d.unit[0].value.as_str()), ("Description", "Training %i"));
    assert_eq!(d.service.len(), 2);
    assert_eq!(d.install.wanted_by, ["multi-user.target"]);
    assert_eq!(d.install.required_by, ["train.target"]);
}

#[test]
fn repeated_keys_append_and_empty_resets() {
    let d = Tree::new()
        .load("[Container]\nExec=/bin/true\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\nEnvironment=B=3\n[GPU]\nDevice=all\nDevice=\nDevice=drm:card0\nDevice=drm:card0\n")
        .unwrap();
    assert_eq!(d.container.environment, [("B".to_owned(), "3".to_owned())]);
    assert_eq!(d.gpu.devices, [Selector::Drm("card0".into())]);
}

#[test]
fn dropins_merge_in_file_name_order_across_search_paths() {
    let t = Tree::new();
    t.write("usr/job.gpubox", "[Container]\nExec=/bin/vendor\nEnvironment=ORDER=usr\n[GPU]\nDevice=drm:card0\n")
        .write("etc/job.gpubox.d/20-b.conf", "[Container]\nEnvironment=ORDER=etc-20\n")
        .write("usr/job.gpubox.d/10-a.conf", "[Container]\nExec=/bin/from-dropin\n[GPU]\nDevice=drm:card1\n")
        // The same file name in a higher-priority path replaces the lower one.
        .write("usr/job.gpubox.d/20-b.conf", "[Container]\nEnvironment=ORDER=usr-20\n")
        .write("usr/job.gpubox.d/30-c.conf", "[Container]\nEnvironment=\nEnvironment=LAST=1\n")
        .write("usr/job.gpubox.d/ignored.txt", "not a drop-in");
    let d = t.search(&["etc", "usr"]).load("job").unwrap();
    assert_eq!(d.container.exec, ["/bin/from-dropin"]);
    assert_eq!(d.container.environment, [("LAST".to_owned(), "1".to_owned())]);
    assert_eq!(d.gpu.devices.len(), 2);
    let names: Vec<String> =
        d.sources.iter().map(|p| p.strip_prefix(t.dir.path()).unwrap().display().to_string()).collect();
    assert_eq!(
        names,
        ["usr/job.gpubox", "usr/job.gpubox.d/10-a.conf", "etc/job.gpubox.d/20-b.conf", "usr/job.gpubox.d/30-c.conf"]
    );
}

#[test]
fn dropin_overrides_single_valued_key_set_in_main_file() {
    let t = Tree::new();
    t.write("etc/job.gpubox", "[Container]\nExec=/bin/a\nNetwork=none\n")
        .write("etc/job.gpubox.d/net.conf", "[Container]\nNetwork=host\n");
    assert_eq!(t.search(&["etc"]).load("job").unwrap().container.network, Network::Host);
}

#[test]
fn first_file_of_a_name_wins_and_dev_null_masks() {
    let t = Tree::new();
    t.write("etc/a.gpubox", "[Container]\nExec=/bin/etc\n").write("usr/a.gpubox", "[Container]\nExec=/bin/usr\n");
    t.write("usr/b.gpubox", MINIMAL).write("usr/c.gpubox", MINIMAL);
    std::os::unix::fs::symlink("/dev/null", t.path("etc/b.gpubox")).unwrap();
    // An empty file masks too, as for units; a directory with the suffix is no definition.
    t.write("etc/c.gpubox", "");
    fs::create_dir_all(t.path("etc/d.gpubox")).unwrap();
    let search = t.search(&["etc", "run-missing", "usr"]);
    assert_eq!(search.load("a").unwrap().container.exec, ["/bin/etc"]);
    let e = search.load("b").unwrap_err().to_string();
    assert!(e.contains("definition 'b' is masked") && e.contains("etc/b.gpubox"), "{e}");
    let all = search.discover().unwrap();
    let summary: Vec<(String, bool)> = all.iter().map(|s| (s.name.clone(), s.masked)).collect();
    assert_eq!(summary, [("a".into(), false), ("b".into(), true), ("c".into(), true)]);
    assert!(all[0].main.ends_with("etc/a.gpubox"));
    let e = search.load("nope").unwrap_err().to_string();
    assert!(e.starts_with("no definition named 'nope' (searched "), "{e}");
}

#[test]
fn masked_dropin_is_skipped() {
    let t = Tree::new();
    t.write("usr/job.gpubox", MINIMAL).write("usr/job.gpubox.d/net.conf", "[Container]\nNetwork=host\n");
    fs::create_dir_all(t.path("etc/job.gpubox.d")).unwrap();
    std::os::unix::fs::symlink("/dev/null", t.path("etc/job.gpubox.d/net.conf")).unwrap();
    assert_eq!(t.search(&["etc", "usr"]).load("job").unwrap().container.network, Network::None);
}

#[test]
fn default_hostname_is_a_valid_hostname() {
    let t = Tree::new();
    let long = "a".repeat(100);
    for (name, want) in [("job", "job"), ("train_01:x", "train-01-x"), (long.as_str(), &long[..64]), ("_", "gpubox")] {
        t.write(&format!("etc/{name}.gpubox"), "[Container]\nExec=/bin/true\nHostname=\n");
        assert_eq!(t.search(&["etc"]).load(name).unwrap().container.hostname, want);
    }
    let d = Tree::new().load("[Container]\nExec=/bin/true\nSeccomp=\"default\"\n").unwrap();
    assert_eq!(d.container.seccomp, Seccomp::Default);
}

#[test]
fn search_path_from_environment() {
    std::env::set_var(PATH_VARIABLE, "/a:/b::/c");
    assert_eq!(SearchPath::from_env().0, [PathBuf::from("/a"), "/b".into(), "/c".into()]);
    std::env::remove_var(PATH_VARIABLE);
    assert_eq!(
        SearchPath::from_env().0,
        [PathBuf::from("/etc/gpubox"), "/run/gpubox".into(), "/usr/lib/gpubox".into()]
    );
}

#[test]
fn errors_name_file_line_section_and_key() {
    let t = Tree::new();
    let cases: &[(&str, &str)] = &[
        ("[Container]\nExec=/bin/true\nColour=blue\n", "/etc/job.gpubox:3: [Container] Colour=: unknown key in [Container] (known: RootDirectory,"),
        ("[Container]\nExec=/bin/true\n[Network]\nX=1\n", "/etc/job.gpubox:3: unknown section [Network]"),
        ("[Container]\nExec=/bin/true\nNetwork=bridge\n", "/etc/job.gpubox:3: [Container] Network=: expected one of none, host, found 'bridge'"),
        ("[Container]\nExec=/bin/true\nReadOnly=maybe\n", "/etc/job.gpubox:3: [Container] ReadOnly=: expected a boolean"),
        ("[Container]\nExec=/bin/a\nExec=/bin/b\n", "/etc/job.gpubox:3: [Container] Exec=: set more than once in this file"),
        ("[Container]\nExec=/bin/true\n\n[GPU]\nDevice=gpu0\n", "/etc/job.gpubox:5: [GPU] Device=: unknown GPU selector 'gpu0'"),
        ("[Container]\nExec=echo \"unterminated\n", "/etc/job.gpubox:2: [Container] Exec=: unterminated \" quote"),
        ("[Container]\nExec=/bin/true\nBind=data:/data\n", "/etc/job.gpubox:3: [Container] Bind=: 'data' is not an absolute path"),
        ("[Container]\nExec=/bin/true\nEnvironment=1A=b\n", "/etc/job.gpubox:3: [Container] Environment=: '1A' is not a valid environment variable name"),
        ("[Container]\nExec=/bin/true\nAddCapability=CAP_FLY\n", "/etc/job.gpubox:3: [Container] AddCapability=: unknown capability 'CAP_FLY'"),
        ("[Container]\nExec=/bin/true\nWorkingDirectory=/srv/%h\n", "/etc/job.gpubox:3: [Container] WorkingDirectory=: unknown specifier '%h'"),
        ("[Container]\nExec=/bin/true\nUser=root:wheel\n", "/etc/job.gpubox:3: [Container] User=: 'root:wheel': expected a user name, UID, or UID:GID"),
        ("[Container]\nExec=/bin/true\nHostname=bad_host\n", "/etc/job.gpubox:3: [Container] Hostname=: 'bad_host' is not a valid hostname"),
        ("[Container]\nExec=/bin/true\n[Service]\nExecStart=/bin/sh\n", "/etc/job.gpubox:4: [Service] ExecStart=: is managed by gpubox and cannot be set here: use [Container] Exec="),
        ("[Container]\nExec=/bin/true\n[Install]\nWantedBy=multi-user\n", "/etc/job.gpubox:4: [Install] WantedBy=: 'multi-user' is not a unit name"),
        ("[Container]\nExec=/bin/true\n[Install]\nAlso=x.service\n", "/etc/job.gpubox:4: [Install] Also=: unknown key in [Install]"),
        ("[Container]\nHostname=x\n", "/etc/job.gpubox: [Container] Exec= is missing"),
        ("[Container]\nExec=\n", "/etc/job.gpubox:2: [Container] Exec=: the command is empty"),
        ("Exec=/bin/true\n", "/etc/job.gpubox:1: 'Exec=' appears before any [Section] header"),
    ];
    for (text, want) in cases {
        let e = t.error(text);
        assert!(e.starts_with(want), "for {text:?}\n  got: {e}\n want: {want}…");
    }
}

#[test]
fn error_in_dropin_names_the_dropin() {
    let t = Tree::new();
    t.write("etc/job.gpubox", MINIMAL).write("etc/job.gpubox.d/50-gpu.conf", "# GPUs\n[GPU]\nHotplug=sometimes\n");
    let e = t.search(&["etc"]).load("job").unwrap_err();
    assert!(e.to_string().ends_with("/etc/job.gpubox.d/50-gpu.conf:3: [GPU] Hotplug=: expected a boolean (yes/no, true/false, on/off, 1/0), found 'sometimes'"), "{e}");
    assert!(e.path().unwrap().ends_with("50-gpu.conf"));
}

#[test]
fn names_must_be_instance_names() {
    let t = Tree::new();
    for (name, ok) in [
        ("job", true),
        ("train-01.gpu:a_b", true),
        ("my job", false),
        (".hidden", false),
        ("a@b", false),
        ("caf\u{e9}", false),
    ] {
        t.write(&format!("etc/{name}.gpubox"), MINIMAL);
        let r = t.search(&["etc"]).load(name);
        assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
        if !ok {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(&format!("{name}.gpubox: invalid definition name")), "{e}");
        }
    }
}

#[test]
fn a_file_given_directly_brings_its_dropins() {
    let t = Tree::new();
    t.write("x/try.gpubox", MINIMAL).write("x/try.gpubox.d/a.conf", "[Container]\nNetwork=host\n");
    let d = Sources::from_file(&t.path("x/try.gpubox")).unwrap().load().unwrap();
    assert_eq!((d.name.as_str(), d.container.network), ("try", Network::Host));
    let e = Sources::from_file(&t.path("x/try.conf")).unwrap_err().to_string();
    assert!(e.ends_with("a definition's file name must end in '.gpubox'"), "{e}");
}

/// `gpuboxctl validate` (issue #15): every mistake of every file, in the order they apply and
/// line by line, each with the nearest known name where one is close; a section in error
/// does not also report each of its keys.
#[test]
fn check_reports_every_error_of_every_file_in_order() {
    let t = Tree::new();
    t.write(
        "etc/job.gpubox",
        "[Container]\nExec=/bin/true\nEnviroment=A=1\nNetwork=bridge\n[Containr]\nFoo=1\nBar=2\n[GPU]\nDevice=nvidai:0\n",
    );
    t.write("etc/job.gpubox.d/10-more.conf", "[Container]\nReadOnly=maybe\n");
    let sources = t.search(&["etc"]).find("job").unwrap();
    let errors: Vec<String> = sources.check().iter().map(|e| e.to_string()).collect();
    let main = t.path("etc/job.gpubox").display().to_string();
    let dropin = t.path("etc/job.gpubox.d/10-more.conf").display().to_string();
    let expected = [
        format!("{main}:3: [Container] Enviroment=: unknown key in [Container] (did you mean Environment=?"),
        format!("{main}:4: [Container] Network=: expected one of none, host, found 'bridge'"),
        format!("{main}:5: unknown section [Containr] (did you mean [Container]?"),
        format!("{main}:9: [GPU] Device=: unknown GPU selector 'nvidai:0' (did you mean nvidia:0?"),
        format!("{dropin}:2: [Container] ReadOnly=: expected a boolean"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, start) in errors.iter().zip(&expected) {
        assert!(error.starts_with(start.as_str()), "{error}\n  does not start with\n{start}");
    }
    // The first of them is what loading says.
    assert_eq!(sources.load().unwrap_err().to_string(), errors[0]);
    // A right definition has none.
    t.write("etc/ok.gpubox", "[Container]\nExec=/bin/true\n");
    assert!(t.search(&["etc"]).find("ok").unwrap().check().is_empty());
}

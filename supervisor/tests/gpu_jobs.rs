//! Issue #16, GPU jobs: `[GPU] Count=N` on stand-in GPUs (the driver's /proc tree and
//! /dev/nvidiaN nodes). Many concurrent starts never share a GPU, a start waits in the queue
//! for a holder to stop, a SIGKILLed holder's GPUs come back, and containers that name their
//! GPUs respect an exclusive holder. Privileged, as container.rs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// A supervisor that is killed if the test ends first (a failed test must not leave a holder).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(gpu: &NvidiaStandIn, def: &Path) -> Child {
    Command::new(SUPERVISOR)
        .args(["run", "--definition"])
        .arg(def)
        .envs(gpu.env())
        .env_remove("INVOCATION_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child, limit: Duration) -> Run {
    let t = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if t.elapsed() > limit {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            panic!("supervisor {pid} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    waiter.join().unwrap().into()
}

/// A started supervisor whose log is read as it comes, so that a test can wait for what it
/// says rather than sleep and hope (the tests run two at a time on a loaded CI machine).
/// Killed if the test ends first, as `Running`.
struct Watched {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Watched {
    fn start(gpu: &NvidiaStandIn, def: &Path) -> Watched {
        use std::io::BufRead;
        let mut child = start(gpu, def);
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        Watched { child: Some(child), lines, log: Some(log) }
    }

    /// Whether the log says `text` within `limit` (lines before it are passed over).
    fn says(&self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.contains(text) {
                return true;
            }
        }
        false
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// As `finish`, with the whole log.
    fn finish(mut self, limit: Duration) -> Run {
        let mut run = finish(self.child.take().unwrap(), limit);
        run.err = self.log.take().unwrap().join().unwrap();
        run
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The payload's view: which stand-in GPUs it has, and when it ran (host clock, ns).
const JOB: &str = "Exec=/bin/sh -c 's=$(date +%%s%%N); sleep 0.2; echo gpus=$(ls /dev | grep -E \"^nvidia[0-9]+$\" | tr \"\\n\" \" \") s=$s e=$(date +%%s%%N)'\n";

fn parse_job(out: &str) -> (Vec<String>, u128, u128) {
    let line = out.lines().find(|l| l.starts_with("gpus=")).unwrap_or_else(|| panic!("no gpus= in {out:?}"));
    let gpus = line["gpus=".len()..line.find(" s=").unwrap()].split_whitespace().map(str::to_owned).collect();
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().parse().unwrap();
    (gpus, field("s="), field("e="))
}

/// 100 jobs started at once, each `Count=1`, on 4 GPUs: each job sees exactly one GPU, and no
/// two jobs ever run on the same GPU at the same time.
#[test]
fn a_hundred_concurrent_jobs_never_share_a_gpu() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(4);
    let tag = std::process::id();
    let children: Vec<Child> = (0..100)
        .map(|i| {
            let def =
                definition(gpu.dir.path(), &format!("job{tag}-{i}"), &format!("[Container]\n{JOB}[GPU]\nCount=1\n"));
            start(&gpu, &def)
        })
        .collect();
    let mut runs: Vec<(Vec<String>, u128, u128)> = Vec::new();
    for child in children {
        let r = finish(child, Duration::from_secs(120));
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(r.err.contains("allocated nvidia:"), "{}", r.err);
        runs.push(parse_job(&r.out));
    }
    let mut used = std::collections::BTreeSet::new();
    for (gpus, s, e) in &runs {
        assert_eq!(gpus.len(), 1, "each job sees exactly its one GPU: {gpus:?}");
        used.insert(gpus[0].clone());
        for (other, s2, e2) in &runs {
            if std::ptr::eq(gpus, other) || gpus != other {
                continue;
            }
            assert!(e <= s2 || e2 <= s, "two jobs on {} at once: {s}..{e} and {s2}..{e2}", gpus[0]);
        }
    }
    assert_eq!(used.len(), 4, "all four GPUs were used: {used:?}");
}

/// One GPU held by a job. A start with `AllocationTimeout=1s` fails with 125 naming the holder;
/// two waiting starts proceed in start order once the holder stops; a SIGKILLed holder's GPU
/// is free at once; a container naming the GPU is refused while a job holds it alone.
#[test]
fn waiting_timeouts_order_and_killed_holders() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(1);
    let d = gpu.dir.path();
    let tag = std::process::id();
    let holder_name = format!("holder{tag}");
    let holder = definition(d, &holder_name, "[Container]\nExec=sleep 60\nInit=yes\n[GPU]\nCount=1\n");
    let mut holder_child = Running(start(&gpu, &holder));
    wait_for_control(&holder_name, Duration::from_secs(30));

    // Not enough free GPUs within the timeout: 125, naming who holds them.
    let impatient = definition(
        d,
        &format!("impatient{tag}"),
        "[Container]\nExec=/bin/true\n[GPU]\nCount=1\nAllocationTimeout=1s\n",
    );
    let t = Instant::now();
    let r = finish(start(&gpu, &impatient), Duration::from_secs(10));
    assert_eq!(r.code, 125, "{}", r.err);
    assert!(t.elapsed() >= Duration::from_millis(900), "gave up early: {:?}", t.elapsed());
    assert!(r.err.contains(&format!("held by {holder_name} (exclusive)")), "{}", r.err);

    // A waiting start stops on SIGTERM (systemctl stop of an "activating" unit), at once.
    let waiter = definition(d, &format!("waiter{tag}"), "[Container]\nExec=/bin/true\n[GPU]\nCount=1\n");
    let waiter = Watched::start(&gpu, &waiter);
    assert!(waiter.says("waiting for 1 GPU", Duration::from_secs(30)), "the waiter never waited");
    nix::sys::signal::kill(waiter.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let r = waiter.finish(Duration::from_secs(5));
    assert_eq!(r.code, 143, "{}", r.err);
    assert!(r.err.contains("stopped by signal 15 while waiting for GPUs"), "{}", r.err);

    // A container that names the GPU is refused while the job holds it alone.
    let named = definition(d, &format!("named{tag}"), "[Container]\nExec=/bin/true\n[GPU]\nDevice=nvidia:0\n");
    let r = finish(start(&gpu, &named), Duration::from_secs(10));
    assert_eq!(r.code, 125, "{}", r.err);
    assert!(r.err.contains("is held by") && r.err.contains(&holder_name), "{}", r.err);

    // Two patient ones, started in this order, wait; then run in that order.
    let first = definition(d, &format!("first{tag}"), &format!("[Container]\n{JOB}[GPU]\nCount=1\n"));
    let second = definition(d, &format!("second{tag}"), &format!("[Container]\n{JOB}[GPU]\nCount=1\n"));
    let first_child = Watched::start(&gpu, &first);
    assert!(first_child.says("waiting for 1 GPU", Duration::from_secs(30)), "the first never waited");
    let second_child = Watched::start(&gpu, &second);
    assert!(second_child.says("waiting for 1 GPU", Duration::from_secs(30)), "the second never waited");
    // The holder is SIGKILLed: its lock goes with it.
    holder_child.0.kill().unwrap();
    holder_child.0.wait().unwrap();
    let (a, b) = (first_child.finish(Duration::from_secs(30)), second_child.finish(Duration::from_secs(30)));
    assert_eq!((a.code, b.code), (0, 0), "{}{}", a.err, b.err);
    assert!(a.err.contains("waiting for 1 GPU"), "{}", a.err);
    let ((_, a_start, a_end), (_, b_start, _)) = (parse_job(&a.out), parse_job(&b.out));
    assert!(a_start < b_start && a_end <= b_start, "the one started first ran first");
}

/// `gpuboxctl devices` shows who holds a GPU and how; `Count=` beyond what the selectors match
/// is a clear error.
#[test]
fn holders_are_visible_and_impossible_counts_are_refused() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(2);
    let d = gpu.dir.path();
    let name = format!("visible{}", std::process::id());
    let mut child =
        Running(start(&gpu, &definition(d, &name, "[Container]\nExec=sleep 60\nInit=yes\n[GPU]\nCount=1\n")));
    wait_for_control(&name, Duration::from_secs(30));
    let ctl = Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    let out = Command::new(&ctl).arg("devices").envs(gpu.env()).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("nvidia:0") && l.contains(&format!("{name} (exclusive)"))), "{table}");
    let status = Command::new(&ctl).args(["status", &name]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("(allocated)"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
    child.0.wait().unwrap();
    let r = finish(
        start(
            &gpu,
            &definition(d, &format!("three{}", std::process::id()), "[Container]\nExec=/bin/true\n[GPU]\nCount=3\n"),
        ),
        Duration::from_secs(10),
    );
    assert_eq!(r.code, 125);
    assert!(r.err.contains("Count=3, but the selectors match only 2 GPUs"), "{}", r.err);
}

/// `NUMA=yes`: the payload runs on its GPU's NUMA node's CPUs, with its memory bound there.
/// The stand-in GPU's node and that node's CPUs come from a stand-in sysfs (`GPUBOX_SYSFS`):
/// node 0 with CPU 1 only, so the effect is visible on any machine with two CPUs.
#[test]
fn numa_binds_the_payload_to_its_gpus_node() {
    if !privileged() {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipping: needs two CPUs");
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(1);
    let sysfs = tempfile::tempdir().unwrap();
    let pci = sysfs.path().join(format!("bus/pci/devices/0000:{:02x}:00.0", gpu.minor));
    std::fs::create_dir_all(&pci).unwrap();
    std::fs::write(pci.join("numa_node"), "0\n").unwrap();
    let node = sysfs.path().join("devices/system/node/node0");
    std::fs::create_dir_all(&node).unwrap();
    std::fs::write(node.join("cpulist"), "1\n").unwrap();
    let def = definition(
        gpu.dir.path(),
        &format!("numa{}", std::process::id()),
        "[Container]\nExec=/bin/sh -c 'grep Cpus_allowed_list /proc/self/status | tr -d \"\\t\" | tr : =; grep -c bind:0 /proc/self/numa_maps | sed s/^/bound=/'\n[GPU]\nCount=1\nNUMA=yes\n",
    );
    let mut env = gpu.env();
    env.push(("GPUBOX_SYSFS", sysfs.path().as_os_str()));
    let r = run_file(&def, &env);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(value(&r, "Cpus_allowed_list"), "1", "{}", r.err);
    assert_ne!(value(&r, "bound"), "0", "memory bound to node 0: {}", r.out);
    assert!(r.err.contains("NUMA=yes: CPUs 1 and memory of node 0"), "{}", r.err);
}

/// An Xid error of the NVIDIA driver on a job's GPU reaches the job's own log; one on another
/// GPU does not. The records are written to /dev/kmsg as the driver's look.
#[test]
fn xid_errors_of_its_gpus_reach_the_jobs_log() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(1);
    let name = format!("xid{}", std::process::id());
    let def = definition(gpu.dir.path(), &name, "[Container]\nExec=sleep 60\nInit=yes\n[GPU]\nCount=1\n");
    let child = Watched::start(&gpu, &def);
    wait_for_control(&name, Duration::from_secs(30));
    // The watch thread opens /dev/kmsg a moment after the start and reads only what comes
    // after (watch.rs): the records are written again until one is seen.
    let own =
        format!("NVRM: Xid (PCI:0000:{:02x}:00): 79, pid=4242, name=python3, GPU has fallen off the bus.\n", gpu.minor);
    let other = "NVRM: Xid (PCI:0000:fe:00): 13, Graphics Exception on another GPU\n";
    let t = Instant::now();
    loop {
        std::fs::write("/dev/kmsg", other).unwrap();
        std::fs::write("/dev/kmsg", &own).unwrap();
        if child.says("NVIDIA Xid on nvidia:0", Duration::from_millis(500)) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no Xid in the job's log");
    }
    let _ = nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM);
    let err = child.finish(Duration::from_secs(20)).err;
    assert!(err.contains("NVIDIA Xid on nvidia:0") && err.contains("79, pid=4242"), "{err}");
    assert!(!err.contains("Graphics Exception on another GPU"), "{err}");
}

/// `gpuboxctl status` shows what the container's own processes use of its GPU (NVML's
/// processes, matched by cgroup): the stand-in libnvidia-ml reports the payload and a process
/// outside the container on the GPU; only the payload counts.
#[test]
fn status_shows_the_containers_own_gpu_use() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(1);
    let name = format!("use{}", std::process::id());
    let def = definition(gpu.dir.path(), &name, "[Container]\nExec=sleep 60\n[GPU]\nCount=1\n");
    let _child = Running(start(&gpu, &def));
    wait_for_control(&name, Duration::from_secs(30));
    let ctl = Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    let status = Command::new(&ctl).args(["status", &name, "--json"]).envs(gpu.env()).output().unwrap();
    let pid = serde_json::from_slice::<serde_json::Value>(&status.stdout).unwrap()["pid"].as_i64().unwrap();
    let procs = format!("{pid}:1073741824:40,{}:999:50", std::process::id());
    let out =
        Command::new(&ctl).args(["status", &name]).envs(gpu.env()).env("FAKE_NVML_PROCS", &procs).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nvidia:0: 1 process of the container's, 1.0 GiB of GPU memory, SM 40 %"), "{text}");
}

/// A job of two GPUs gets a pair joined by NVLink (NVML's topology, from the stand-in
/// libnvidia-ml) before GPUs that are merely next to each other in bus order.
#[test]
fn a_two_gpu_job_gets_an_nvlink_pair() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(4);
    let bus = |i: u32| format!("0000:{:02x}:00.0", gpu.minor + i);
    let def = definition(
        gpu.dir.path(),
        &format!("pair{}", std::process::id()),
        "[Container]\nExec=/bin/true\n[GPU]\nCount=2\n",
    );
    let mut env = gpu.env();
    let nvlink = format!("{}+{}", bus(1), bus(3));
    env.push(("FAKE_NVML_NVLINK", nvlink.as_ref()));
    let r = run_file(&def, &env);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("allocated nvidia:1, nvidia:3 of 4"), "{}", r.err);
}

/// A CDI kind's devices are GPUs to the allocator: `Device=cdi:VENDOR/CLASS=all` with
/// `Count=1` takes one device of the kind (never the spec's `all` device itself), two jobs get
/// two different ones, and a third finds none free.
#[test]
fn count_takes_one_device_of_a_cdi_kind() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tag = std::process::id();
    let kind = format!("gpubox-test-{tag}.example.com/gpu");
    for n in ["s0", "s1"] {
        standin_node(&d.join(n));
    }
    std::fs::create_dir(d.join("cdi")).unwrap();
    std::fs::write(
        d.join("cdi/standin.yaml"),
        format!(
            "cdiVersion: \"0.6.0\"\nkind: {kind}\ndevices:\n  - name: \"0\"\n    containerEdits:\n      deviceNodes: [{{path: /dev/standin0, hostPath: {d}/s0}}]\n  - name: \"1\"\n    containerEdits:\n      deviceNodes: [{{path: /dev/standin1, hostPath: {d}/s1}}]\n  - name: all\n    containerEdits:\n      deviceNodes: [{{path: /dev/standin0, hostPath: {d}/s0}}, {{path: /dev/standin1, hostPath: {d}/s1}}]\n",
            d = d.display()
        ),
    )
    .unwrap();
    let job = |name: &str, extra: &str| {
        definition(d, &format!("{name}{tag}"), &format!("[Container]\nExec=/bin/sh -c 'ls /dev | grep standin; exec sleep 60'\nInit=yes\n[GPU]\nDevice=cdi:{kind}=all\nCount=1\n{extra}"))
    };
    let cdi = d.join("cdi");
    let spawn = |def: &Path| {
        Command::new(SUPERVISOR)
            .args(["run", "--definition"])
            .arg(def)
            .env("GPUBOX_CDI_DIRS", &cdi)
            .env("GPUBOX_NVIDIA_PROC", "/nonexistent")
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = Running(spawn(&job("cdia", "")));
    let second = Running(spawn(&job("cdib", "")));
    wait_for_control(&format!("cdia{tag}"), Duration::from_secs(30));
    wait_for_control(&format!("cdib{tag}"), Duration::from_secs(30));
    let third = spawn(&job("cdic", "AllocationTimeout=0\n"));
    let r = finish(third, Duration::from_secs(10));
    assert_eq!(r.code, 125, "{}", r.err);
    assert!(r.err.contains("0 of 2 free"), "{}", r.err);
    let ctl = Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    let nodes = |name: &str| {
        let out =
            Command::new(&ctl).args(["status", &format!("{name}{tag}")]).env("GPUBOX_CDI_DIRS", &cdi).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains(&format!("cdi:{kind}=")) && text.contains("(allocated)"), "{text}");
        text.lines()
            .filter(|l| l.contains("(allocated)"))
            .map(|l| l.split(": ").nth(1).unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    let (a, b) = (nodes("cdia"), nodes("cdib"));
    assert_eq!((a.len(), b.len()), (1, 1), "{a:?} {b:?}");
    assert_ne!(a, b, "two jobs, two devices");
    drop((first, second));
}

/// An exclusive holder's GPU is given to no one else while it runs: `gpuboxctl attach` of it
/// to another container is refused, naming the holder.
#[test]
fn an_exclusive_gpu_is_not_given_by_attach() {
    if !privileged() {
        return;
    }
    let gpu = NvidiaStandIn::with_gpus(1);
    let d = gpu.dir.path();
    let tag = std::process::id();
    let (job, other) = (format!("excl{tag}"), format!("attacher{tag}"));
    let _job = Running(start(&gpu, &definition(d, &job, "[Container]\nExec=sleep 60\nInit=yes\n[GPU]\nCount=1\n")));
    wait_for_control(&job, Duration::from_secs(30));
    let _other = Running(start(&gpu, &definition(d, &other, "[Container]\nExec=sleep 60\nInit=yes\n")));
    wait_for_control(&other, Duration::from_secs(30));
    let ctl = Path::new(SUPERVISOR).with_file_name("gpuboxctl");
    let out = Command::new(&ctl).args(["attach", &other, "nvidia:0"]).envs(gpu.env()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach of an exclusively held GPU succeeded");
    assert!(err.contains(&job), "the refusal names the holder: {err}");
}

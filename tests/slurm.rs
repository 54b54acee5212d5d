//! A real Slurm on this machine: the test starts its own single-machine cluster (slurmctld and
//! two slurmd "nodes" on 127.0.0.1 with their own ports, as plain processes: no systemd,
//! `proctrack/linuxproc`, `task/none`, no accounting, `auth/none` between daemons that share
//! one host), submits an array job of two `pipeline run embed` workers and a dependent
//! `pipeline merge`, and checks what they recorded. Skipped, saying why, where Slurm's
//! programs are not installed (`.ci/run` installs Debian's slurmctld, slurmd and slurm-client).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::pipeline;

const PROGRAMS: [&str; 5] = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo"];

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A cluster of one slurmctld and two slurmd, stopped (and its processes killed) on drop.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
            .to_string();
        for sub in ["state", "spool-n1", "spool-n2", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let user = Command::new("id").arg("-un").output().unwrap();
        let user = String::from_utf8_lossy(&user.stdout).trim().to_string();
        let d = dir.display();
        let conf = format!(
            "ClusterName=prefcap-test\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmctldPort={ctl}\n\
             SlurmdPort={slurmd}\n\
             AuthType=auth/none\n\
             CredType=cred/none\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\n\
             SchedulerType=sched/builtin\n\
             JobCompType=jobcomp/none\n\
             AccountingStorageType=accounting_storage/none\n\
             MpiDefault=none\n\
             SlurmUser={user}\n\
             SlurmdUser={user}\n\
             ReturnToService=2\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool-%n\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd-%n.log\n\
             NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs=1 RealMemory=1000\n\
             NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs=1 RealMemory=1000\n\
             PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP\n",
            ctl = free_port(),
            slurmd = free_port(),
            n1 = free_port(),
            n2 = free_port(),
        );
        let path = dir.join("slurm.conf");
        std::fs::write(&path, conf).unwrap();
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: path,
        };
        cluster.daemon("slurmctld", &["-c", "-i"]);
        cluster.daemon("slurmd", &["-N", "n1"]);
        cluster.daemon("slurmd", &["-N", "n2"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = cluster.client("sinfo", &["-h", "-o", "%D %T"]);
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if text == "2 idle" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster did not come up (sinfo: `{text}`):\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster
    }

    fn daemon(&self, program: &str, args: &[&str]) {
        let status = Command::new(find(program).unwrap())
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{program} {args:?} failed:\n{}",
            self.logs()
        );
    }

    fn client(&self, program: &str, args: &[&str]) -> Output {
        Command::new(find(program).unwrap())
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"] {
            let text = std::fs::read_to_string(self.dir.join("log").join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out += &format!("--- {name}\n");
            for line in tail.into_iter().rev() {
                out += line;
                out.push('\n');
            }
        }
        out
    }

    /// `sbatch --parsable ARGS`: the job id.
    fn submit(&self, args: &[&str]) -> String {
        let out = self.client("sbatch", &[&["--parsable"], args].concat());
        assert!(
            out.status.success(),
            "sbatch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits for job `id` to end; its final state.
    fn wait(&self, id: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.client("scontrol", &["show", "job", id]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let state = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("JobState="))
                .unwrap_or("")
                .to_string();
            if [
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ]
            .contains(&state.as_str())
            {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {state}:\n{text}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.client("scontrol", &["shutdown"]);
        std::thread::sleep(Duration::from_millis(500));
        for pid_file in ["slurmctld.pid", "slurmd-n1.pid", "slurmd-n2.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(pid_file)) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

#[test]
fn an_array_job_of_embed_workers_and_a_dependent_merge_run_on_slurm() {
    if let Some(missing) = PROGRAMS.iter().find(|p| find(p).is_none()) {
        eprintln!(
            "SKIPPED: `{missing}` is not installed, so there is no Slurm to run on \
             (apt-get install slurmctld slurmd slurm-client, as .ci/run does)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&tmp.path().join("slurm"));
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let sets = [
        "ingest.synthetic.train_images=24",
        "ingest.synthetic.val_images=8",
        "ingest.synthetic.shard_size=8",
        "ingest.synthetic.train_stories=0",
        "ingest.synthetic.val_stories=0",
        "clip.model=\"tiny\"",
        "embed.datasets=[\"synthetic\"]",
        "embed.batch_size=8",
        "run.workers=1",
    ];
    let flags: String = sets.iter().map(|s| format!(" --set '{s}'")).collect();
    let mut ingest = vec!["run", "ingest"];
    for s in &sets {
        ingest.extend(["--set", s]);
    }
    let (out, text) = pipeline(&ingest, &work);
    assert!(out.status.success(), "{text}");

    let bin = env!("CARGO_BIN_EXE_pipeline");
    let chdir = format!("--chdir={}", work.display());
    let array = cluster.submit(&[
        "--array=0-1",
        "--job-name=embed",
        &chdir,
        "--output=worker-%a.out",
        "--wrap",
        &format!("PREFCAP_QUIET=1 {bin} run embed --num-workers 2{flags}"),
    ]);
    let dependency = format!("--dependency=afterany:{array}");
    let merge = cluster.submit(&[
        &dependency,
        "--job-name=merge",
        &chdir,
        "--output=merge.out",
        "--wrap",
        &format!("{bin} merge embed --num-workers 2{flags}"),
    ]);
    let state = cluster.wait(&merge, Duration::from_secs(600));
    let read = |name: &str| std::fs::read_to_string(work.join(name)).unwrap_or_default();
    let transcript = format!(
        "--- worker 0\n{}\n--- worker 1\n{}\n--- merge\n{}\n{}",
        read("worker-0.out"),
        read("worker-1.out"),
        read("merge.out"),
        cluster.logs()
    );
    assert_eq!(state, "COMPLETED", "{transcript}");
    assert!(
        read("merge.out").contains("embed merged as run"),
        "{transcript}"
    );

    let run = common::newest_run(&work);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    let details = &record["steps"][0][1]["details"];
    let workers = details["workers"].as_array().unwrap();
    let indices: Vec<u64> = workers
        .iter()
        .map(|w| w["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, vec![0, 1], "{record}");
    assert!(
        workers.iter().all(|w| w["outcome"] == "finished"),
        "{record}"
    );
    // Train has shards 0..3 (worker 0 owns 0 and 2), val one shard: all planned, all done.
    let sets: Vec<(String, u64, u64)> = details["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["set"].as_str().unwrap().to_string(),
                s["units"].as_u64().unwrap(),
                s["finished"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sets,
        vec![
            ("data/synthetic/train".to_string(), 3, 3),
            ("data/synthetic/val".to_string(), 1, 1)
        ],
        "{record}"
    );
    // Each Slurm task embedded its own share (an image and a text entry per shard): worker 0
    // owns train 0 and 2 and val 0, worker 1 train 1.
    for (w, entries, images) in [(&workers[0], 6, 24), (&workers[1], 2, 8)] {
        let summary = w["summary"].as_str().unwrap();
        assert!(
            summary.starts_with(&format!("{entries} entries computed"))
                && summary.contains(&format!("{images} images")),
            "{summary}\n{transcript}"
        );
    }
    drop(cluster);
}

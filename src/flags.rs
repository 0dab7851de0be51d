//! The syntax of the `run` command's flags whose values are more than one
//! word: parsed here into the VMM's configuration types. (A TOML file says
//! the same in tables; see `rtvm_vmm::config`.)

use std::path::PathBuf;
use std::str::FromStr;

use rtvm_vmm::config::{RtPolicy, ShareConfig};

/// `--rt-vcpu INDEX:prio=P[,cpu=C]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtVcpuArg {
    pub vcpu: usize,
    pub policy: RtPolicy,
}

impl FromStr for RtVcpuArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            || format!("'{s}' is not of the form INDEX:prio=P[,cpu=C] (e.g. 1:prio=80,cpu=1)");
        let (index, rest) = s.split_once(':').ok_or_else(usage)?;
        let vcpu = index.trim().parse().map_err(|_| usage())?;
        let mut priority = None;
        let mut cpu = None;
        for part in rest.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(usage)?;
            let v: usize = v
                .trim()
                .parse()
                .map_err(|_| format!("'{part}': not a number"))?;
            match k.trim() {
                "prio" | "priority" => {
                    priority = Some(
                        u8::try_from(v)
                            .map_err(|_| format!("RT priority {v} is out of range 1..=99"))?,
                    )
                }
                "cpu" => cpu = Some(v),
                other => return Err(format!("unknown RT setting '{other}' (use prio, cpu)")),
            }
        }
        let policy = RtPolicy {
            priority: priority.ok_or_else(usage)?,
            cpu,
        };
        policy.validate()?;
        Ok(RtVcpuArg { vcpu, policy })
    }
}

/// `--share DIR[:ro]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareArg(pub ShareConfig);

impl FromStr for ShareArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.strip_suffix(":ro") {
            Some(p) => (p, true),
            None => (s.strip_suffix(":rw").unwrap_or(s), false),
        };
        if path.is_empty() {
            return Err("--share needs a directory (DIR or DIR:ro)".into());
        }
        Ok(ShareArg(ShareConfig::new(PathBuf::from(path), read_only)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rt_vcpu_args_parse_and_validate() {
        let a: RtVcpuArg = "1:prio=80,cpu=0".parse().unwrap();
        assert_eq!(
            a,
            RtVcpuArg {
                vcpu: 1,
                policy: RtPolicy {
                    priority: 80,
                    cpu: Some(0)
                }
            }
        );
        let a: RtVcpuArg = "0:priority=10".parse().unwrap();
        assert_eq!(a.policy.cpu, None);
        assert!("1".parse::<RtVcpuArg>().is_err());
        assert!("1:prio=0"
            .parse::<RtVcpuArg>()
            .unwrap_err()
            .contains("out of range"));
        assert!("1:prio=100"
            .parse::<RtVcpuArg>()
            .unwrap_err()
            .contains("out of range"));
        assert!("1:prio=300"
            .parse::<RtVcpuArg>()
            .unwrap_err()
            .contains("out of range"));
        assert!("1:prio=50,cpu=4096"
            .parse::<RtVcpuArg>()
            .unwrap_err()
            .contains("does not exist"));
        assert!("1:prio=50,core=1"
            .parse::<RtVcpuArg>()
            .unwrap_err()
            .contains("unknown RT setting"));
        assert!("x:prio=50".parse::<RtVcpuArg>().is_err());
    }

    #[test]
    fn share_args_name_a_directory_and_may_be_read_only() {
        let ShareArg(share) = "/srv/data:ro".parse().unwrap();
        assert_eq!((share.path, share.read_only), ("/srv/data".into(), true));
        let ShareArg(share) = "/srv/data".parse().unwrap();
        assert!(!share.read_only);
        let ShareArg(share) = "/srv/data:rw".parse().unwrap();
        assert_eq!(share.path, PathBuf::from("/srv/data"));
        assert!(":ro".parse::<ShareArg>().unwrap_err().contains("--share"));
    }
}

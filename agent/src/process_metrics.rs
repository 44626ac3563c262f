//! Process metrics (RSS, CPU seconds, file descriptors, threads, start
//! time: Linux) for the agent, the repository and the operator: one
//! collector, so the three report the same names the same way.
#![cfg(target_os = "linux")]

/// The process metrics of `prometheus`'s collector, with
/// `process_cpu_seconds_total` to the hundredth of a second: the crate
/// counts whole seconds (an `IntCounter`), so an agent that used 0.9 s in
/// a minute showed 0, and a dashboard's CPU rate moved in steps of 1 s.
pub struct Process(prometheus::process_collector::ProcessCollector);

impl Process {
    /// This process's metrics.
    pub fn for_self() -> Process {
        Process(prometheus::process_collector::ProcessCollector::for_self())
    }
}

impl prometheus::core::Collector for Process {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(secs) = cpu_seconds() {
            for f in &mut families {
                if f.name() == "process_cpu_seconds_total" {
                    for m in f.mut_metric() {
                        let mut c = prometheus::proto::Counter::new();
                        c.set_value(secs);
                        m.set_counter(c);
                    }
                }
            }
        }
        families
    }
}

/// User and system CPU seconds of this process, from `/proc/self/stat`
/// (fields 14 and 15, in clock ticks of 1/100 s: `USER_HZ`, fixed for
/// `/proc` on Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU counter has hundredths: some work shows as a fraction.
    #[test]
    fn cpu_seconds_are_fractional_and_reported() {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        let secs = cpu_seconds().unwrap();
        assert!(secs > 0.0);
        let p = Process::for_self();
        let families = prometheus::core::Collector::collect(&p);
        let cpu = families
            .iter()
            .find(|f| f.name() == "process_cpu_seconds_total")
            .unwrap();
        let v = cpu.get_metric()[0].counter.value();
        // Whole seconds would show less than what was used already.
        assert!(v >= secs && v < secs + 0.5, "{v} vs {secs}");
    }
}

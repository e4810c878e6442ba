//! The worker's own part of `limits.memory`: an address-space backstop.

/// Slack added to the address-space cap on top of `limits.memory`: thread
/// stacks and malloc arenas reserve far more address space than they use.
const ADDRESS_SPACE_SLACK: u64 = 4 << 30;

fn statm_size_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().next()?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64);
    Some(pages * page)
}

/// The worker's part of `limits.memory` where the host enforces it by
/// sampling (no cgroup holds it): a backstop that costs nothing at run
/// time. The address space is capped at what is mapped now (the zygote's
/// mappings, a plugin's shared tables among them) plus the limit plus
/// [`ADDRESS_SPACE_SLACK`], so a module allocating faster than the host
/// samples cannot take the machine's memory. The limit itself is the
/// host's: it counts the module's private memory, which the worker does not
/// watch (a thread doing so would wake the idle module).
pub(super) fn cap_address_space(limit: u64) {
    if let Some(vsz) = statm_size_bytes() {
        let cap = vsz
            .saturating_add(limit)
            .saturating_add(ADDRESS_SPACE_SLACK);
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, cap, cap);
    }
}

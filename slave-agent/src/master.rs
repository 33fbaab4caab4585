//! Which master: the primary, the secondary or the backup. A slave always has a primary, may
//! have a secondary (usually another site) and may have a backup master (a backup-context
//! master that stands in only while no production master answers); [`PerMaster`] keeps one
//! value for each.

/// One of the slave's masters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Master {
    Primary,
    Secondary,
    Backup,
}

impl Master {
    /// Every master a slave can name, in the order a slave prefers them.
    pub(crate) const ALL: [Master; 3] = [Master::Primary, Master::Secondary, Master::Backup];

    /// `primary`, `secondary` or `backup`, as logs, events, the status and the metrics name
    /// it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Master::Primary => "primary",
            Master::Secondary => "secondary",
            Master::Backup => "backup",
        }
    }
}

/// One value per master. The value of a master that is not configured exists too: it then
/// stays as it started (a link state that is never connected, a histogram that is never
/// observed).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PerMaster<T> {
    pub(crate) primary: T,
    pub(crate) secondary: T,
    pub(crate) backup: T,
}

impl<T> PerMaster<T> {
    /// One value per master, from `f`.
    pub(crate) fn from_fn(mut f: impl FnMut(Master) -> T) -> Self {
        Self {
            primary: f(Master::Primary),
            secondary: f(Master::Secondary),
            backup: f(Master::Backup),
        }
    }

    pub(crate) fn get(&self, master: Master) -> &T {
        match master {
            Master::Primary => &self.primary,
            Master::Secondary => &self.secondary,
            Master::Backup => &self.backup,
        }
    }

    pub(crate) fn get_mut(&mut self, master: Master) -> &mut T {
        match master {
            Master::Primary => &mut self.primary,
            Master::Secondary => &mut self.secondary,
            Master::Backup => &mut self.backup,
        }
    }

    /// Every value, the primary's first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        [&self.primary, &self.secondary, &self.backup].into_iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        [&mut self.primary, &mut self.secondary, &mut self.backup].into_iter()
    }
}

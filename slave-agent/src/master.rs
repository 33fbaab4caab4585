//! Which master: the primary or the secondary. A slave always has a primary and may have a
//! secondary (usually another site); [`PerMaster`] keeps one value for each.

/// One of the slave's two masters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Master {
    Primary,
    Secondary,
}

impl Master {
    /// `primary` or `secondary`, as logs, events, the status and the metrics name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Master::Primary => "primary",
            Master::Secondary => "secondary",
        }
    }

    /// The other master of the pair.
    pub(crate) fn other(self) -> Master {
        match self {
            Master::Primary => Master::Secondary,
            Master::Secondary => Master::Primary,
        }
    }
}

/// One value per master. The secondary's value exists even when no secondary is
/// configured: it then stays as it started (a link state that is never connected, a
/// histogram that is never observed).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PerMaster<T> {
    pub(crate) primary: T,
    pub(crate) secondary: T,
}

impl<T> PerMaster<T> {
    pub(crate) fn get(&self, master: Master) -> &T {
        match master {
            Master::Primary => &self.primary,
            Master::Secondary => &self.secondary,
        }
    }

    pub(crate) fn get_mut(&mut self, master: Master) -> &mut T {
        match master {
            Master::Primary => &mut self.primary,
            Master::Secondary => &mut self.secondary,
        }
    }

    /// Both values, the primary's first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        [&self.primary, &self.secondary].into_iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        [&mut self.primary, &mut self.secondary].into_iter()
    }
}

//! The mutations that wait in a slot's queue for whoever holds the session's lock, and what
//! their callers get back (see `inner`'s "Combining"). A leaf: the slot stores these
//! and the write-through produces them, and neither needs the other to name them.

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::SessionError;
use crate::model::TaskSession;
use crate::policy::{Mutation, Reserve, Settle};

/// What a mutation did.
pub(crate) struct Mutated {
    pub(crate) session: TaskSession,
    pub(crate) changed: bool,
}

impl std::fmt::Debug for Mutated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mutated")
            .field("session_id", &self.session.session_id)
            .field("changed", &self.changed)
            .finish()
    }
}

/// A mutation's outcome as its caller receives it.
pub(crate) type Answer = Result<Mutated, SessionError>;

/// A mutation waiting in a slot's queue, and where its answer goes. A caller that gave up
/// drops the receiving end, which tells the lock holder to skip it.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) mutation: OwnedMutation,
    pub(crate) reply: oneshot::Sender<Answer>,
}

impl Queued {
    /// `mutation`, queued, and the receiver its caller waits on.
    pub(crate) fn new(mutation: Mutation<'_>) -> (Self, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            mutation: OwnedMutation::new(mutation),
            reply,
        };
        (queued, answer)
    }

    /// Whether its caller stopped waiting (deadline or cancellation): it made no call.
    pub(crate) fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// A [`Mutation`] that owns its tools, to wait in a queue.
#[derive(Debug)]
pub(crate) enum OwnedMutation {
    Use {
        tools: Vec<String>,
        agent: Option<Uuid>,
        cost: Option<u64>,
        reserve: Option<Reserve>,
    },
    Settle(Settle),
    Close,
    Expire,
}

impl OwnedMutation {
    fn new(mutation: Mutation<'_>) -> Self {
        match mutation {
            Mutation::Use {
                tools,
                agent,
                cost,
                reserve,
            } => OwnedMutation::Use {
                tools: tools.iter().map(|t| (*t).to_owned()).collect(),
                agent,
                cost,
                reserve,
            },
            Mutation::Settle(settle) => OwnedMutation::Settle(settle),
            Mutation::Close => OwnedMutation::Close,
            Mutation::Expire => OwnedMutation::Expire,
        }
    }

    /// The tools as borrowed names (empty unless a use).
    pub(crate) fn tools(&self) -> Vec<&str> {
        match self {
            OwnedMutation::Use { tools, .. } => tools.iter().map(String::as_str).collect(),
            OwnedMutation::Settle(_) | OwnedMutation::Close | OwnedMutation::Expire => Vec::new(),
        }
    }

    /// The mutation, borrowing `tools` (from [`Self::tools`]).
    pub(crate) fn borrow<'a>(&self, tools: &'a [&'a str]) -> Mutation<'a> {
        match self {
            OwnedMutation::Use {
                agent,
                cost,
                reserve,
                ..
            } => Mutation::Use {
                tools,
                agent: *agent,
                cost: *cost,
                reserve: *reserve,
            },
            OwnedMutation::Settle(settle) => Mutation::Settle(*settle),
            OwnedMutation::Close => Mutation::Close,
            OwnedMutation::Expire => Mutation::Expire,
        }
    }
}

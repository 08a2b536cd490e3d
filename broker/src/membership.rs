//! Which stages are in the cluster, followed from their retained
//! `lime/status/<stage>` documents (their last wills say when they vanish).

use lime_schemas::{topics, StageState, StageStatus};
use std::collections::BTreeMap;

/// The stages known to be online, by name.
#[derive(Debug, Default)]
pub struct Membership {
    online: BTreeMap<String, StageStatus>,
}

/// What a status message changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Joined(StageStatus),
    Updated(StageStatus),
    Left(String),
    /// Not a usable status document.
    Invalid {
        topic: String,
        reason: String,
    },
}

impl Membership {
    pub fn online(&self) -> impl Iterator<Item = &StageStatus> {
        self.online.values()
    }

    /// Applies one message from `lime/status/+`; `None` when nothing changed.
    pub fn apply(&mut self, topic: &str, payload: &[u8]) -> Option<Change> {
        let Some(stage) = topics::stage_of_status(topic) else {
            return Some(Change::Invalid {
                topic: topic.into(),
                reason: "not a stage status topic".into(),
            });
        };
        if payload.is_empty() {
            // A cleared retained status: the stage is gone for good.
            return self
                .online
                .remove(stage)
                .map(|_| Change::Left(stage.into()));
        }
        let status: StageStatus = match serde_json::from_slice(payload) {
            Ok(s) => s,
            Err(e) => {
                return Some(Change::Invalid {
                    topic: topic.into(),
                    reason: e.to_string(),
                })
            }
        };
        if status.stage != stage {
            return Some(Change::Invalid {
                topic: topic.into(),
                reason: format!("document names stage {:?}", status.stage),
            });
        }
        match status.state {
            StageState::Offline => self
                .online
                .remove(stage)
                .map(|_| Change::Left(stage.into())),
            StageState::Starting | StageState::Online => {
                match self.online.insert(stage.to_owned(), status.clone()) {
                    None => Some(Change::Joined(status)),
                    Some(old) if old != status => Some(Change::Updated(status)),
                    Some(_) => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(stage: &str, state: StageState) -> Vec<u8> {
        serde_json::to_vec(&StageStatus {
            state,
            ..StageStatus::offline(stage)
        })
        .unwrap()
    }

    #[test]
    fn stages_join_change_and_leave() {
        let mut m = Membership::default();
        let t = topics::status("s1");
        assert!(matches!(
            m.apply(&t, &doc("s1", StageState::Starting)),
            Some(Change::Joined(_))
        ));
        assert!(matches!(
            m.apply(&t, &doc("s1", StageState::Online)),
            Some(Change::Updated(_))
        ));
        assert_eq!(m.apply(&t, &doc("s1", StageState::Online)), None);
        assert_eq!(m.online().count(), 1);
        assert_eq!(
            m.apply(&t, &doc("s1", StageState::Offline)),
            Some(Change::Left("s1".into()))
        );
        assert_eq!(m.apply(&t, &doc("s1", StageState::Offline)), None);
    }

    #[test]
    fn bad_documents_are_reported() {
        let mut m = Membership::default();
        let t = topics::status("s1");
        assert!(matches!(
            m.apply(&t, b"{oops"),
            Some(Change::Invalid { .. })
        ));
        assert!(matches!(
            m.apply(&t, &doc("s2", StageState::Online)),
            Some(Change::Invalid { .. })
        ));
        assert_eq!(m.online().count(), 0);
    }
}

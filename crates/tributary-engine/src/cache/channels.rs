//! Pub/sub channels of the embedded cache: fire-and-forget messages to whoever is subscribed
//! now, the counterpart of Redis's PUBLISH / SUBSCRIBE.
//!
//! A channel is a bounded broadcast ([`CACHE_SUBSCRIBER_BUFFER`] messages): a subscriber that
//! falls that far behind skips ahead and is told so with [`Delivery::Gap`]. Nothing is stored:
//! a message published while nobody is subscribed is gone. A channel with no subscriber left is
//! removed on the next publish to it.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tributary_core::limits::CACHE_SUBSCRIBER_BUFFER;

/// What a subscription to a cache channel yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// One published message; a subscription yields them in the order the cache took them.
    Message(Bytes),
    /// Messages may have been missed here: the subscriber fell behind, or (on a networked
    /// backend) its connection was lost and made again. What a subscriber keeps from the
    /// channel should be read again from where it is stored.
    Gap,
}

/// The messages published to one channel after the subscription began. Dropping it
/// unsubscribes.
pub type Subscription = futures_util::stream::BoxStream<'static, Delivery>;

#[derive(Default)]
pub(super) struct Channels {
    senders: Mutex<HashMap<Bytes, broadcast::Sender<Bytes>>>,
}

impl Channels {
    /// Hand `message` to every current subscriber of `channel`; returns how many there were.
    pub(super) fn publish(&self, channel: &[u8], message: Bytes) -> usize {
        let mut senders = self.senders.lock();
        let Some(sender) = senders.get(channel) else { return 0 };
        match sender.send(message) {
            Ok(receivers) => receivers,
            Err(_) => {
                senders.remove(channel);
                0
            }
        }
    }

    pub(super) fn subscribe(&self, channel: &[u8]) -> Subscription {
        let receiver = self.senders.lock().entry(Bytes::copy_from_slice(channel)).or_insert_with(|| broadcast::channel(CACHE_SUBSCRIBER_BUFFER).0).subscribe();
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(message) => Some((Delivery::Message(message), receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => Some((Delivery::Gap, receiver)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed()
    }

    /// Channels that still have a sender (for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.senders.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_gets_a_gap_and_a_channel_nobody_hears_is_removed() {
        let channels = Channels::default();
        let mut slow = channels.subscribe(b"c");
        for i in 0..CACHE_SUBSCRIBER_BUFFER + 10 {
            assert_eq!(channels.publish(b"c", Bytes::from(i.to_string())), 1);
        }
        // The oldest ten were overwritten: a gap, then the rest in order.
        assert_eq!(slow.next().await, Some(Delivery::Gap));
        for i in 10..CACHE_SUBSCRIBER_BUFFER + 10 {
            assert_eq!(slow.next().await, Some(Delivery::Message(Bytes::from(i.to_string()))));
        }
        drop(slow);
        assert_eq!(channels.len(), 1);
        assert_eq!(channels.publish(b"c", Bytes::from_static(b"nobody")), 0);
        assert_eq!(channels.len(), 0, "the first publish nobody hears removes the channel");
        assert_eq!(channels.publish(b"never-subscribed", Bytes::from_static(b"x")), 0);
        assert_eq!(channels.len(), 0);
    }
}

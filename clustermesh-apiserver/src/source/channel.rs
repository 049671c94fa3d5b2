//! A source fed through a channel (tests, benchmarks, and adapters such as Kubernetes).

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Source, SourceEvent};

/// A [`Source`] whose events are sent through the paired [`mpsc::Sender`].
#[derive(Debug)]
pub struct ChannelSource {
    rx: mpsc::Receiver<SourceEvent>,
}

impl ChannelSource {
    /// A source and the sender that feeds it (`capacity` events of buffer).
    pub fn new(capacity: usize) -> (mpsc::Sender<SourceEvent>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }
}

impl Source for ChannelSource {
    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxStream<'static, SourceEvent> {
        tokio_stream::wrappers::ReceiverStream::new(self.rx)
            .take_until(shutdown.cancelled_owned())
            .boxed()
    }
}

//! Lines written one at a time to a sink that may take part of one and then fail (a full
//! disk, a closed pipe): the audit log's JSON-lines copy and the server's log.

use std::io::Write;

/// A sink written one whole line at a time. When it takes part of a line and then fails,
/// the next line starts with a newline, so that only the cut line is broken: the lines on
/// either side of a gap used to run together into one.
pub struct LineSink<W> {
    out: W,
    mid_line: bool,
}

impl<W: Write> LineSink<W> {
    /// Lines to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            mid_line: false,
        }
    }

    /// Writes `line` (ending in a newline) whole, or returns the error that cut it.
    ///
    /// # Errors
    ///
    /// The sink's error; the line may then be partly written.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.mid_line {
            write_counting(&mut self.out, b"\n", &mut 0)?;
            self.mid_line = false;
        }
        let mut written = 0;
        let result = write_counting(&mut self.out, line, &mut written);
        self.mid_line = result.is_err() && written > 0;
        result
    }

    /// Flushes the sink.
    ///
    /// # Errors
    ///
    /// The sink's error.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `write_all`, counting in `written` the bytes the writer took, also before an error.
///
/// # Errors
///
/// The writer's error (`WriteZero` for a writer that takes nothing).
pub fn write_counting(
    out: &mut impl Write,
    mut buf: &[u8],
    written: &mut usize,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        match out.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *written += n;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
